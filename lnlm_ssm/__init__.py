"""lnlm_ssm: state-space-model (Mamba) kernels and the language models built from them."""

from lnlm_ssm import ops
from lnlm_ssm._version import __version__
from lnlm_ssm.layers.quantized import quantize_
from lnlm_ssm.models import (
    AnyOrderLM,
    AnyOrderLMConfig,
    ElectraConfig,
    ElectraPretraining,
    Encoder,
    EncoderConfig,
    MambaLM,
    MambaLMConfig,
    MaskedLM,
    PermutationLM,
    PermutationLMConfig,
    ReplacedTokenDetector,
    SentenceOrderMaskedLM,
    Seq2SeqConfig,
    Seq2SeqLM,
    SequenceClassifier,
    TokenClassifier,
    from_pretrained,
)

__all__ = [
    "AnyOrderLM",
    "AnyOrderLMConfig",
    "ElectraConfig",
    "ElectraPretraining",
    "Encoder",
    "EncoderConfig",
    "MambaLM",
    "MambaLMConfig",
    "MaskedLM",
    "PermutationLM",
    "PermutationLMConfig",
    "ReplacedTokenDetector",
    "SentenceOrderMaskedLM",
    "Seq2SeqConfig",
    "Seq2SeqLM",
    "SequenceClassifier",
    "TokenClassifier",
    "__version__",
    "from_pretrained",
    "ops",
    "quantize_",
]
