"""Language models stacked from lnlm_ssm.layers."""

from lnlm_ssm.models.config import PRESETS, ConfigError, MambaLMConfig, preset

__all__ = ["PRESETS", "ConfigError", "MambaLMConfig", "preset"]
