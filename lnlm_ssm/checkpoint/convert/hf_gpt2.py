"""HF transformers' ``GPT2LMHeadModel`` (model_type "gpt2") as an attention-only MambaLM.

GPT-2 is our pre-norm block with LayerNorms (with biases), attention and a
plain GELU MLP with biases, learned absolute positions, and a final LayerNorm.
Its projections are ``Conv1D`` modules, whose weights are stored (in, out):
transposed to nn.Linear's (out, in) here. ``c_attn``'s output columns are
[q, k, v], each head-major, as our ``in_proj`` rows.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lnlm_ssm.checkpoint.convert import Converter, require
from lnlm_ssm.checkpoint.load import CheckpointError
from lnlm_ssm.layers.mlp import ACTIVATIONS

LAYOUT = "HF gpt2"

# Fields that change the computation in ways we do not build, and the value we can build.
_UNSUPPORTED = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False}


def _config(raw: dict[str, Any]) -> dict[str, Any]:
    for name, supported in _UNSUPPORTED.items():
        if raw.get(name, supported) != supported:
            raise CheckpointError(
                f"config.json of a {LAYOUT} checkpoint has {name}={raw[name]!r}; only {name}={supported!r} is supported"
            )
    act = raw.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise CheckpointError(
            f"config.json of a {LAYOUT} checkpoint has activation_function {act!r}; supported: {sorted(ACTIVATIONS)}"
        )
    d_model = require(raw, "n_embd", LAYOUT)
    num_heads = require(raw, "n_head", LAYOUT)
    attn_cfg = dict(
        num_heads=num_heads,
        head_dim=d_model // num_heads,
        qkv_proj_bias=True,
        out_proj_bias=True,
    )
    if not raw.get("scale_attn_weights", True):
        attn_cfg["softmax_scale"] = 1.0
    return dict(
        d_model=d_model,
        n_layer=require(raw, "n_layer", LAYOUT),
        vocab_size=require(raw, "vocab_size", LAYOUT),
        # HF checkpoints pad the vocabulary in vocab_size itself: keep exactly vocab_size logits.
        pad_vocab_size_multiple=1,
        d_intermediate=raw.get("n_inner") or 4 * d_model,
        layer_pattern="A",
        attn_cfg=attn_cfg,
        rms_norm=False,
        norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
        # GPT-2 adds its residual in the model dtype.
        residual_in_fp32=False,
        tie_embeddings=raw.get("tie_word_embeddings", True),
        max_position_embeddings=require(raw, "n_positions", LAYOUT),
        mlp_type="plain",
        mlp_act=act,
        mlp_bias=True,
    )


_TOP = {
    "transformer.wte.weight": "backbone.embedding.weight",
    "transformer.wpe.weight": "backbone.position_embedding.weight",
    "transformer.ln_f.weight": "backbone.norm_f.weight",
    "transformer.ln_f.bias": "backbone.norm_f.bias",
}
_LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)")
# GPT-2 module -> ours, and whether its weight is a Conv1D's (stored transposed).
_LAYER_MODULES = {
    "ln_1": ("norm", False),
    "attn.c_attn": ("mixer.in_proj", True),
    "attn.c_proj": ("mixer.out_proj", True),
    "ln_2": ("norm2", False),
    "mlp.c_fc": ("mlp.fc1", True),
    "mlp.c_proj": ("mlp.fc2", True),
}
# Older transformers saved the causal mask as a buffer of each attention layer.
_MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def _state(state: dict[str, torch.Tensor], fields: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        match = _LAYER.fullmatch(key)
        if key in _TOP:
            out[_TOP[key]] = t
        elif _MASK_BUFFER.fullmatch(key):
            continue
        elif match is not None and match.group(2) in _LAYER_MODULES:
            ours, conv1d = _LAYER_MODULES[match.group(2)]
            param = match.group(3)
            out[f"backbone.layers.{match.group(1)}.{ours}.{param}"] = (
                t.t().contiguous() if conv1d and param == "weight" else t
            )
        else:
            out[key] = t  # lm_head.weight, or a stray key that the strict check reports
    return out


CONVERTER = Converter(layout=LAYOUT, model_type="gpt2", config=_config, state=_state)
