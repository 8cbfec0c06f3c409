"""lnlm_ssm: state-space-model (Mamba) kernels and the language models built from them."""

__version__ = "0.1.0"

from lnlm_ssm import ops  # noqa: E402,F401
