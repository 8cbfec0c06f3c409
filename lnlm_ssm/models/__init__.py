"""Model families built from lnlm_ssm.layers, and the registry that loads them from checkpoints.

- ``config``: MambaLMConfig and the presets;
- ``registry``: architecture -> config class, model class, converters, presets; ``preset``, ``from_pretrained``;
- ``base``: PretrainedModel (save / load), ``backbone``: embedding + blocks + final norm;
- ``heads``: LM head and its loss; ``causal_lm``: MambaLM;
- ``classification``: SequenceClassifier and TokenClassifier, task heads on a pretrained backbone.
"""

from lnlm_ssm.checkpoint.load import CheckpointError
from lnlm_ssm.checkpoint.save import save_pretrained
from lnlm_ssm.models.base import PretrainedModel
from lnlm_ssm.models.causal_lm import MambaLM, MambaLMOutput
from lnlm_ssm.models.classification import ClassifierConfig, ClassifierOutput, SequenceClassifier, TokenClassifier
from lnlm_ssm.models.config import PRESETS, ConfigError, MambaLMConfig
from lnlm_ssm.models.registry import architectures, from_pretrained, preset, preset_architecture, preset_names, register

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ClassifierConfig",
    "ClassifierOutput",
    "ConfigError",
    "MambaLM",
    "MambaLMConfig",
    "MambaLMOutput",
    "PretrainedModel",
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
