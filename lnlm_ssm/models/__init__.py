"""Language models stacked from lnlm_ssm.layers."""

from lnlm_ssm.models.checkpoint import CheckpointError, load_pretrained, save_pretrained
from lnlm_ssm.models.config import PRESETS, ConfigError, MambaLMConfig, preset
from lnlm_ssm.models.lm import MambaLM, MambaLMOutput

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "MambaLM",
    "MambaLMConfig",
    "MambaLMOutput",
    "load_pretrained",
    "preset",
    "save_pretrained",
]
