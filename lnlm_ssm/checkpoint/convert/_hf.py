"""What the HF transformers layouts share: the activation check, the fields every HF causal LM has, Mamba's key names."""

from __future__ import annotations

from typing import Any

from lnlm_ssm.checkpoint.convert import State, rename_prefix, require
from lnlm_ssm.checkpoint.load import CheckpointError


def check_silu(raw: dict[str, Any], layout: str) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"config.json of a {layout} checkpoint has hidden_act {act!r}; only 'silu' is supported")


def causal_lm_fields(raw: dict[str, Any], layout: str) -> dict[str, Any]:
    return dict(
        d_model=require(raw, "hidden_size", layout),
        n_layer=require(raw, "num_hidden_layers", layout),
        vocab_size=require(raw, "vocab_size", layout),
        # HF checkpoints pad the vocabulary in vocab_size itself: keep exactly vocab_size logits.
        pad_vocab_size_multiple=1,
    )


def mamba_backbone_state(state: State, fields: dict[str, Any]) -> State:
    """HF Mamba / Mamba-2 keys are mamba_ssm's (ours) but for one name: ``backbone.embeddings``."""
    return rename_prefix(state, "backbone.embeddings.", "backbone.embedding.")
