"""mamba_ssm's layout: its MambaConfig fields in config.json (no model_type), ``pytorch_model.bin``.

Our state-dict keys are mamba_ssm's, so its weights load as they are.
"""

from __future__ import annotations

from typing import Any

from lnlm_ssm.checkpoint.convert import Converter


def _config(raw: dict[str, Any]) -> dict[str, Any]:
    # fused_add_norm picks a kernel in mamba_ssm; the numbers are the same without it.
    fields = {k: v for k, v in raw.items() if k != "fused_add_norm"}
    attn_cfg = dict(fields.get("attn_cfg") or {})
    if attn_cfg.get("mlp_dim", 0) == 0:
        # mamba_ssm writes mlp_dim=0 for "no MLP inside the attention block", our Attention has none.
        attn_cfg.pop("mlp_dim", None)
    fields["attn_cfg"] = attn_cfg
    return fields


CONVERTER = Converter(
    layout="mamba_ssm",
    model_type=None,
    config=_config,
    detect=lambda raw: "model_type" not in raw and {"d_model", "n_layer"} <= raw.keys(),
)
