"""Model families built from lnlm_ssm.layers, and the registry that loads them from checkpoints.

- ``config``: MambaLMConfig and the presets;
- ``registry``: architecture -> config class, model class, converters, presets; ``preset``, ``from_pretrained``;
- ``base``: PretrainedModel (save / load), ``backbone``: embedding + blocks + final norm;
- ``heads``: LM head and its loss; ``causal_lm``: MambaLM;
- ``encoder``: the bidirectional Encoder; ``masked_lm``: MaskedLM, SentenceOrderMaskedLM,
  ReplacedTokenDetector and ElectraPretraining;
- ``seq2seq``: Seq2SeqLM (T5, and T5 with Mamba decoder layers), its config and presets.
- ``permutation_lm``: PermutationLM (XLNet); ``any_order_lm``: AnyOrderLM (a MambaLM in any order).
- ``classification``: SequenceClassifier and TokenClassifier, task heads on a pretrained backbone.
"""

from lnlm_ssm.checkpoint.load import CheckpointError
from lnlm_ssm.checkpoint.save import save_pretrained
from lnlm_ssm.models.any_order_lm import AnyOrderLM, AnyOrderLMConfig
from lnlm_ssm.models.base import PretrainedModel
from lnlm_ssm.models.causal_lm import MambaLM, MambaLMOutput
from lnlm_ssm.models.classification import ClassifierConfig, ClassifierOutput, SequenceClassifier, TokenClassifier
from lnlm_ssm.models.config import PRESETS, ConfigError, ElectraConfig, EncoderConfig, MambaLMConfig
from lnlm_ssm.models.encoder import Encoder, EncoderOutput
from lnlm_ssm.models.masked_lm import (
    ElectraPretraining,
    MaskedLM,
    MaskedLMOutput,
    ReplacedTokenDetector,
    SentenceOrderMaskedLM,
    TokenDetectionOutput,
)
from lnlm_ssm.models.permutation_lm import PermutationLM, PermutationLMConfig, PermutationLMOutput
from lnlm_ssm.models.registry import architectures, from_pretrained, preset, preset_architecture, preset_names, register
from lnlm_ssm.models.seq2seq import SEQ2SEQ_PRESETS, Seq2SeqConfig, Seq2SeqLM, Seq2SeqLMOutput

__all__ = [
    "PRESETS",
    "AnyOrderLM",
    "AnyOrderLMConfig",
    "CheckpointError",
    "ClassifierConfig",
    "ClassifierOutput",
    "ConfigError",
    "ElectraConfig",
    "ElectraPretraining",
    "Encoder",
    "EncoderConfig",
    "EncoderOutput",
    "MambaLM",
    "MambaLMConfig",
    "MambaLMOutput",
    "MaskedLM",
    "MaskedLMOutput",
    "PermutationLM",
    "PermutationLMConfig",
    "PermutationLMOutput",
    "PretrainedModel",
    "ReplacedTokenDetector",
    "SEQ2SEQ_PRESETS",
    "SentenceOrderMaskedLM",
    "Seq2SeqConfig",
    "Seq2SeqLM",
    "Seq2SeqLMOutput",
    "TokenDetectionOutput",
    "SequenceClassifier",
    "TokenClassifier",
    "architectures",
    "from_pretrained",
    "preset",
    "preset_architecture",
    "preset_names",
    "register",
    "save_pretrained",
]
