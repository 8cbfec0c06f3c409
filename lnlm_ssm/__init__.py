"""lnlm_ssm: state-space-model (Mamba) kernels and the language models built from them."""

__version__ = "0.1.0"

from lnlm_ssm import ops  # noqa: E402,F401
from lnlm_ssm.models.config import MambaLMConfig  # noqa: E402
from lnlm_ssm.models.lm import MambaLM  # noqa: E402

__all__ = ["MambaLM", "MambaLMConfig", "ops"]
