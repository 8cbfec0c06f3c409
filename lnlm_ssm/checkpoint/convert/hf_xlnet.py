"""HF transformers' ``XLNetLMHeadModel`` (model_type "xlnet") as a PermutationLM.

The weights keep their names. What the config maps:

- ``attn_type`` must be "bi" (XLNet's bidirectional attention; "uni" is not built)
  and ``bi_data`` false (the bidirectional data pipeline of pre-training);
- ``reuse_len`` must be unset: memory is the last ``mem_len`` positions;
- ``untie_r`` becomes true whatever it says: HF stores (and uses) every layer's
  ``r_w_bias``, ``r_r_bias`` and ``r_s_bias`` apart;
- ``mem_len`` null (HF: keep every position) becomes 0 (keep none): the logits do
  not change, only which ``mems`` are returned;
- ``same_length`` matters only to "uni" attention and is ignored.
"""

from __future__ import annotations

from typing import Any

from lnlm_ssm.checkpoint.convert import Converter, require
from lnlm_ssm.checkpoint.load import CheckpointError

LAYOUT = "HF xlnet"

_ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu", "swish")


def _unsupported(field: str, value: Any, expected: str) -> CheckpointError:
    return CheckpointError(f"config.json of a {LAYOUT} checkpoint has {field}={value!r}; only {expected} is supported")


def _config(raw: dict[str, Any]) -> dict[str, Any]:
    if raw.get("attn_type", "bi") != "bi":
        raise _unsupported("attn_type", raw["attn_type"], "'bi'")
    if raw.get("bi_data", False):
        raise _unsupported("bi_data", raw["bi_data"], "false")
    if raw.get("reuse_len") not in (None, 0):
        raise _unsupported("reuse_len", raw["reuse_len"], "null")
    activation = raw.get("ff_activation", "gelu")
    if activation not in _ACTIVATIONS:
        raise _unsupported("ff_activation", activation, f"one of {list(_ACTIVATIONS)}")
    d_model = require(raw, "d_model", LAYOUT)
    n_head = require(raw, "n_head", LAYOUT)
    return dict(
        vocab_size=require(raw, "vocab_size", LAYOUT),
        d_model=d_model,
        n_layer=require(raw, "n_layer", LAYOUT),
        n_head=n_head,
        d_head=raw.get("d_head") or d_model // n_head,
        d_inner=require(raw, "d_inner", LAYOUT),
        ff_activation=activation,
        untie_r=True,
        layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
        dropout=raw.get("dropout", 0.1),
        mem_len=raw.get("mem_len") or 0,
        clamp_len=raw.get("clamp_len", -1),
        tie_embeddings=raw.get("tie_word_embeddings", True),
    )


CONVERTER = Converter(layout=LAYOUT, model_type="xlnet", config=_config)
