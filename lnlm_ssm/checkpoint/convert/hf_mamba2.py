"""HF transformers' ``Mamba2ForCausalLM`` (model_type "mamba2")."""

from __future__ import annotations

from typing import Any

from lnlm_ssm.checkpoint.convert import Converter, require
from lnlm_ssm.checkpoint.convert._hf import causal_lm_fields, check_silu, mamba_backbone_state
from lnlm_ssm.checkpoint.load import CheckpointError
from lnlm_ssm.utils.checks import NO_DT_LIMIT

LAYOUT = "HF mamba2"


def _config(raw: dict[str, Any]) -> dict[str, Any]:
    check_silu(raw, LAYOUT)
    d_model = require(raw, "hidden_size", LAYOUT)
    expand = raw.get("expand", 2)
    num_heads, head_dim = require(raw, "num_heads", LAYOUT), raw.get("head_dim", 64)
    if num_heads * head_dim != expand * d_model:
        raise CheckpointError(
            f"config.json of a {LAYOUT} checkpoint: num_heads * head_dim ({num_heads} * {head_dim}) must equal "
            f"expand * hidden_size ({expand} * {d_model})"
        )
    eps = raw.get("layer_norm_epsilon", 1e-5)
    ssm_cfg = dict(
        layer="Mamba2",
        d_state=raw.get("state_size", 128),
        d_conv=raw.get("conv_kernel", 4),
        expand=expand,
        headdim=head_dim,
        ngroups=raw.get("n_groups", 8),
        chunk_size=raw.get("chunk_size", 256),
        # A list, as JSON gives it back: configs then compare equal after a save and load.
        dt_limit=list(raw.get("time_step_limit", NO_DT_LIMIT)),
        # HF's gated norm multiplies by silu(z) before normalising, in groups of d_inner / ngroups.
        norm_before_gate=raw.get("norm_before_gate", False),
        norm_eps=eps,
        bias=raw.get("use_bias", False),
        conv_bias=raw.get("use_conv_bias", True),
    )
    return dict(
        causal_lm_fields(raw, LAYOUT),
        ssm_cfg=ssm_cfg,
        norm_epsilon=eps,
        residual_in_fp32=raw.get("residual_in_fp32", True),
        tie_embeddings=raw.get("tie_word_embeddings", False),
    )


CONVERTER = Converter(
    layout=LAYOUT,
    model_type="mamba2",
    config=_config,
    state=mamba_backbone_state,
)
