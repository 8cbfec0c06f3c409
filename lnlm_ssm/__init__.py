"""lnlm_ssm: state-space-model (Mamba) kernels and the language models built from them."""

from lnlm_ssm import ops
from lnlm_ssm._version import __version__
from lnlm_ssm.layers.quantized import quantize_
from lnlm_ssm.models import MambaLM, MambaLMConfig, from_pretrained
from lnlm_ssm.models import SequenceClassifier, TokenClassifier

__all__ = ["MambaLM", "MambaLMConfig", "__version__", "from_pretrained", "ops", "quantize_"]
__all__ += ["SequenceClassifier", "TokenClassifier"]
