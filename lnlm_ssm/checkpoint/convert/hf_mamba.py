"""HF transformers' ``MambaForCausalLM`` (model_type "mamba")."""

from __future__ import annotations

import math
from typing import Any

from lnlm_ssm.checkpoint.convert import Converter, require
from lnlm_ssm.checkpoint.convert._hf import causal_lm_fields, check_silu, mamba_backbone_state

LAYOUT = "HF mamba"


def _config(raw: dict[str, Any]) -> dict[str, Any]:
    check_silu(raw, LAYOUT)
    d_model = require(raw, "hidden_size", LAYOUT)
    dt_rank = raw.get("time_step_rank", "auto")
    ssm_cfg = dict(
        layer="Mamba1",
        d_state=raw.get("state_size", 16),
        d_conv=raw.get("conv_kernel", 4),
        expand=raw.get("expand", 2),
        dt_rank=math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank,
        bias=raw.get("use_bias", False),
        conv_bias=raw.get("use_conv_bias", True),
    )
    return dict(
        causal_lm_fields(raw, LAYOUT),
        ssm_cfg=ssm_cfg,
        norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        tie_embeddings=raw.get("tie_word_embeddings", True),
    )


CONVERTER = Converter(
    layout=LAYOUT,
    model_type="mamba",
    config=_config,
    state=mamba_backbone_state,
)
