"""HF transformers' ``LlamaForCausalLM`` (model_type "llama") as an attention-only MambaLM.

Llama's attention and MLP projections are concatenated into our ``in_proj``
(rows [q, k, v]) and ``fc1`` (rows [up, gate]); the MLP's hidden size is padded
with zero rows up to GatedMLP's rounded size, which changes no output.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lnlm_ssm.checkpoint.convert import Converter, require
from lnlm_ssm.checkpoint.convert._hf import causal_lm_fields, check_silu
from lnlm_ssm.checkpoint.load import CheckpointError
from lnlm_ssm.layers.mlp import rounded_hidden_size

LAYOUT = "HF llama"


def _config(raw: dict[str, Any]) -> dict[str, Any]:
    check_silu(raw, LAYOUT)
    d_model = require(raw, "hidden_size", LAYOUT)
    num_heads = require(raw, "num_attention_heads", LAYOUT)
    head_dim = raw.get("head_dim") or d_model // num_heads
    if raw.get("mlp_bias", False):
        raise CheckpointError(f"config.json of a {LAYOUT} checkpoint has mlp_bias=true; our gated MLP has no biases")
    # transformers < 5 writes rope_theta + rope_scaling, >= 5 rope_parameters {rope_type, rope_theta}.
    rope = raw.get("rope_parameters") or {}
    if raw.get("rope_scaling") is not None or rope.get("rope_type", "default") != "default":
        scaling = raw.get("rope_scaling") or rope
        raise CheckpointError(
            f"config.json of a {LAYOUT} checkpoint asks for RoPE scaling {scaling!r}; only plain RoPE "
            "(rope_scaling null, rope_type 'default') is supported"
        )
    bias = raw.get("attention_bias", False)
    attn_cfg = dict(
        num_heads=num_heads,
        num_heads_kv=raw.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        # HF Llama rotates every channel of a head, pairing channel j with j + head_dim / 2.
        rotary_emb_dim=head_dim,
        rotary_emb_base=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rotary_emb_interleaved=False,
        qkv_proj_bias=bias,
        out_proj_bias=bias,
    )
    return dict(
        causal_lm_fields(raw, LAYOUT),
        d_intermediate=require(raw, "intermediate_size", LAYOUT),
        layer_pattern="A",
        attn_cfg=attn_cfg,
        norm_epsilon=raw.get("rms_norm_eps", 1e-6),
        # HF Llama adds its residual in the model dtype.
        residual_in_fp32=False,
        tie_embeddings=raw.get("tie_word_embeddings", False),
    )


_LLAMA_TOP = {"model.embed_tokens.weight": "backbone.embedding.weight", "model.norm.weight": "backbone.norm_f.weight"}
_LLAMA_LAYER = {
    "input_layernorm.weight": "norm.weight",
    "post_attention_layernorm.weight": "norm2.weight",
    "self_attn.o_proj.weight": "mixer.out_proj.weight",
    "self_attn.o_proj.bias": "mixer.out_proj.bias",
    "mlp.down_proj.weight": "mlp.fc2.weight",
}
# Our key <- HF keys, concatenated along the output rows in this order.
_LLAMA_CONCAT = {
    "mixer.in_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mixer.in_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    # GatedMLP computes value * silu(gate) with fc1 rows [value; gate]: Llama's up is the value.
    "mlp.fc1.weight": ("mlp.up_proj.weight", "mlp.gate_proj.weight"),
}
_LLAMA_PART_OF = {part: (ours, i) for ours, parts in _LLAMA_CONCAT.items() for i, part in enumerate(parts)}
_LLAMA_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
def _state(state: dict[str, torch.Tensor], fields: dict[str, Any]) -> dict[str, torch.Tensor]:
    d_intermediate = fields["d_intermediate"]
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, t in state.items():
        match = _LLAMA_LAYER_KEY.fullmatch(key)
        if key in _LLAMA_TOP:
            out[_LLAMA_TOP[key]] = t
        elif match is None:
            out[key] = t  # lm_head.weight, or a stray key that the strict check reports
        elif match.group(2) == "self_attn.rotary_emb.inv_freq":
            continue  # older transformers saved this buffer; it follows from rope_theta
        elif match.group(2) in _LLAMA_LAYER:
            out[f"backbone.layers.{match.group(1)}.{_LLAMA_LAYER[match.group(2)]}"] = t
        elif match.group(2) in _LLAMA_PART_OF:
            ours, i = _LLAMA_PART_OF[match.group(2)]
            groups.setdefault((match.group(1), ours), {})[i] = t
        else:
            out[key] = t
    incomplete = []
    for (layer, ours), parts in groups.items():
        names = _LLAMA_CONCAT[ours]
        if len(parts) != len(names):
            incomplete += [f"model.layers.{layer}.{names[i]}" for i in range(len(names)) if i not in parts]
            continue
        if ours == "mlp.fc1.weight":
            parts = {i: _pad_rows(t, d_intermediate) for i, t in parts.items()}
        out[f"backbone.layers.{layer}.{ours}"] = torch.cat([parts[i] for i in range(len(names))], dim=0)
    if incomplete:
        raise CheckpointError(f"the {LAYOUT} checkpoint lacks {sorted(incomplete)} (its other parts are present)")
    for key in [k for k in out if k.endswith(".mlp.fc2.weight")]:
        out[key] = _pad_rows(out[key].t(), d_intermediate).t().contiguous()
    return out


def _pad_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """Zero rows appended up to GatedMLP's rounded hidden size.

    Exact: a zero value row and a zero gate row give 0 * silu(0) = 0, which the
    zero columns of fc2 then ignore. Rows beyond ``hidden`` are left for the
    shape check to report.
    """
    rounded = rounded_hidden_size(hidden)
    if t.shape[0] != hidden or rounded == hidden:
        return t
    return torch.cat([t, t.new_zeros(rounded - hidden, *t.shape[1:])], dim=0)


CONVERTER = Converter(layout=LAYOUT, model_type="llama", config=_config, state=_state)
