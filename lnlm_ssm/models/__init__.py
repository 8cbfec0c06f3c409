"""Language models stacked from lnlm_ssm.layers."""

from lnlm_ssm.models.config import PRESETS, ConfigError, MambaLMConfig, preset
from lnlm_ssm.models.lm import MambaLM, MambaLMOutput

__all__ = ["PRESETS", "ConfigError", "MambaLM", "MambaLMConfig", "MambaLMOutput", "preset"]
