"""HF transformers' ``T5ForConditionalGeneration`` (model_type "t5", and mT5's "mt5") as a Seq2SeqLM.

T5 v1.0 has the ungated ``relu`` feed-forward and a head tied to the embedding;
v1.1 and mT5 the gated ``gelu_new`` (``feed_forward_proj`` "gated-gelu") and an
untied head. Whether the head reads the decoder's output scaled by
d_model**-0.5: transformers >= 5 records it as ``scale_decoder_outputs`` (and
always writes ``tie_word_embeddings`` true, storing the head only when it
differs from the embedding); older versions scale exactly when
``tie_word_embeddings``, and transformers >= 5 never for mT5.

The per-block sublayers ``layer.{j}`` become named ones; q, k, v are concatenated
into our ``in_proj`` (self-attention) or ``q_proj`` + ``kv_proj`` (cross);
``wi_1`` (the value) and ``wi_0`` (the gated one) into the gated MLP's ``fc1``.
The relative attention bias, stored in block 0 of each stack, is the stack's.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from lnlm_ssm.checkpoint.convert import Converter, require
from lnlm_ssm.checkpoint.load import CheckpointError

LAYOUT = "HF t5"
# feed_forward_proj's activation -> ours. HF runs "gated-gelu" with the tanh GELU ("gelu_new").
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "silu": "silu"}


def _ffn(raw: dict[str, Any], layout: str) -> tuple[str, bool]:
    proj = raw.get("feed_forward_proj", "relu")
    parts = proj.split("-") if isinstance(proj, str) else [None]
    gated = len(parts) == 2 and parts[0] == "gated"
    act = parts[-1] if len(parts) == 1 or gated else None
    if act == "gelu" and gated:
        act = "gelu_new"
    if act not in _ACTIVATIONS:
        raise CheckpointError(
            f"config.json of a {layout} checkpoint has feed_forward_proj {proj!r}; supported: "
            f"{sorted(_ACTIVATIONS)} and their 'gated-' forms"
        )
    return _ACTIVATIONS[act], gated


def _single_id(raw: dict[str, Any], key: str, default: Any, layout: str) -> Any:
    value = raw.get(key, default)
    if isinstance(value, list):
        if len(value) != 1:
            raise CheckpointError(f"config.json of a {layout} checkpoint has {key} {value!r}; only one id is supported")
        value = value[0]
    return value


def _config_for(layout: str, scales_when_tied: bool):
    def config(raw: dict[str, Any]) -> dict[str, Any]:
        if raw.get("is_encoder_decoder", True) is not True:
            raise CheckpointError(
                f"config.json of a {layout} checkpoint has is_encoder_decoder {raw['is_encoder_decoder']!r}; "
                "only the encoder-decoder (T5ForConditionalGeneration) is supported"
            )
        if raw.get("is_decoder", False):
            raise CheckpointError(
                f"config.json of a {layout} checkpoint has is_decoder true (a decoder alone); not supported"
            )
        n_layer = require(raw, "num_layers", layout)
        activation, gated = _ffn(raw, layout)
        tie = raw.get("tie_word_embeddings", True)
        pad = _single_id(raw, "pad_token_id", 0, layout)
        return dict(
            vocab_size=require(raw, "vocab_size", layout),
            d_model=require(raw, "d_model", layout),
            num_heads=require(raw, "num_heads", layout),
            head_dim=require(raw, "d_kv", layout),
            d_ff=require(raw, "d_ff", layout),
            n_encoder_layer=n_layer,
            n_decoder_layer=raw.get("num_decoder_layers") or n_layer,
            ffn_activation=activation,
            ffn_gated=gated,
            relative_attention_num_buckets=raw.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=raw.get("relative_attention_max_distance", 128),
            norm_epsilon=raw.get("layer_norm_epsilon", 1e-6),
            tie_embeddings=tie,
            scale_decoder_output=raw.get("scale_decoder_outputs", tie and scales_when_tied),
            # HF checkpoints pad the vocabulary in vocab_size itself: keep exactly vocab_size logits.
            pad_vocab_size_multiple=1,
            pad_token_id=pad,
            eos_token_id=_single_id(raw, "eos_token_id", 1, layout),
            decoder_start_token_id=_single_id(raw, "decoder_start_token_id", pad, layout),
        )

    return config


_BLOCK_KEY = re.compile(r"(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)")
# (stack, sublayer index) -> the name of that sublayer's norm in our block.
_NORMS = {("encoder", 0): "norm", ("encoder", 1): "norm2", ("decoder", 0): "norm", ("decoder", 1): "cross_norm",
          ("decoder", 2): "norm2"}
# The feed-forward's sublayer index per stack.
_FFN = {"encoder": 1, "decoder": 2}
_FFN_KEYS = {"DenseReluDense.wi.weight": "mlp.fc1.weight", "DenseReluDense.wo.weight": "mlp.fc2.weight"}
# Our key <- HF keys (within a block), concatenated along the output rows in this order.
_CONCAT = {
    "mixer.in_proj.weight": ("SelfAttention.q.weight", "SelfAttention.k.weight", "SelfAttention.v.weight"),
    "cross_attn.kv_proj.weight": ("EncDecAttention.k.weight", "EncDecAttention.v.weight"),
    # GatedMLP computes value * act(gate) with fc1 rows [value; gate]: T5's wi_1 is the value, wi_0 the gate.
    "mlp.fc1.weight": ("DenseReluDense.wi_1.weight", "DenseReluDense.wi_0.weight"),
}
_PART_OF = {part: (ours, i) for ours, parts in _CONCAT.items() for i, part in enumerate(parts)}
_RENAME = {
    "SelfAttention.o.weight": "mixer.out_proj.weight",
    "EncDecAttention.q.weight": "cross_attn.q_proj.weight",
    "EncDecAttention.o.weight": "cross_attn.out_proj.weight",
}


def _state(state: dict[str, torch.Tensor], fields: dict[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, str, str], dict[int, torch.Tensor]] = {}
    shared = state.get("shared.weight")
    for key, t in state.items():
        match = _BLOCK_KEY.fullmatch(key)
        if key == "shared.weight":
            out["embedding.weight"] = t
        elif key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            # transformers < 5 stored the embedding three times; every copy must be the one embedding.
            if shared is not None and not torch.equal(t, shared):
                raise CheckpointError(
                    f"the {LAYOUT} checkpoint's {key} differs from shared.weight; T5 shares one embedding"
                )
        elif key in ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
            out[key.split(".")[0] + ".norm_f.weight"] = t
        elif match is None:
            out[key] = t  # lm_head.weight, or a stray key that the strict check reports
        else:
            stack, block, sub, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
            prefix = f"{stack}.layers.{block}."
            if rest.endswith("relative_attention_bias.weight"):
                if rest.startswith("EncDecAttention"):
                    continue  # old checkpoints hold one for cross-attention, which T5 never uses
                if block != 0:
                    raise CheckpointError(
                        f"the {LAYOUT} checkpoint has a relative_attention_bias in {stack} block {block}: a position "
                        "bias per layer (UMT5's) is not supported; T5 has one per stack, in block 0"
                    )
                out[f"{stack}.position_bias.weight"] = t
            elif rest == "layer_norm.weight" and (stack, sub) in _NORMS:
                out[prefix + _NORMS[stack, sub] + ".weight"] = t
            elif sub == _FFN[stack] and rest in _FFN_KEYS:
                out[prefix + _FFN_KEYS[rest]] = t
            elif rest in _RENAME:
                out[prefix + _RENAME[rest]] = t
            elif rest in _PART_OF:
                ours, i = _PART_OF[rest]
                groups.setdefault((stack, str(block), ours), {})[i] = t
            else:
                out[key] = t
    incomplete = []
    for (stack, block, ours), parts in groups.items():
        names = _CONCAT[ours]
        if len(parts) != len(names):
            incomplete += [f"{stack}.block.{block}.*.{names[i]}" for i in range(len(names)) if i not in parts]
            continue
        out[f"{stack}.layers.{block}.{ours}"] = torch.cat([parts[i] for i in range(len(names))], dim=0)
    if incomplete:
        raise CheckpointError(f"the {LAYOUT} checkpoint lacks {sorted(incomplete)} (its other parts are present)")
    return out


CONVERTER = Converter(layout=LAYOUT, model_type="t5", config=_config_for(LAYOUT, True), state=_state)
# transformers >= 5 never scales mT5's decoder output (its released checkpoints are untied, and so unscaled).
MT5_CONVERTER = Converter(layout="HF mt5", model_type="mt5", config=_config_for("HF mt5", False), state=_state)
