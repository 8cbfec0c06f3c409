"""MambaLMConfig: what a MambaLM is made of, field names as in mamba_ssm's MambaConfig.

The layer stack is described by ``layer_pattern``, one character per layer,
repeated to ``n_layer``:

====  ===========================================================
char  layer
====  ===========================================================
``M``  the SSM layer that ``ssm_cfg["layer"]`` names ("Mamba1", the default, or "Mamba2")
``1``  Mamba-1 (``lnlm_ssm.layers.Mamba``)
``2``  Mamba-2 (``lnlm_ssm.layers.Mamba2``)
``A``  causal self-attention (``lnlm_ssm.layers.Attention``)
====  ===========================================================

or, the incumbent's way, by ``attn_layer_idx`` (attention at those indices, the
``ssm_cfg`` layer elsewhere). Every block has a gated MLP after its mixer when
``d_intermediate > 0``. ``ssm_cfg`` and ``attn_cfg`` hold the keyword arguments
of the layer constructors (mamba_ssm's names: d_state, d_conv, expand, headdim,
...; num_heads, num_heads_kv, head_dim, rotary_emb_dim, ...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from lnlm_ssm.utils.checks import check_nonnegative_int, check_positive_int
from lnlm_ssm.utils.files import atomic_write

LAYER_CHARS = {"1": "Mamba1", "2": "Mamba2", "A": "Attention"}
SSM_LAYERS = ("Mamba1", "Mamba2")


class ConfigError(ValueError):
    """A config field has a value that cannot describe a model."""


@dataclass
class MambaLMConfig:
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_intermediate: int = 0
    layer_pattern: Optional[str] = None
    attn_layer_idx: list[int] = field(default_factory=list)
    ssm_cfg: dict[str, Any] = field(default_factory=dict)
    attn_cfg: dict[str, Any] = field(default_factory=dict)
    rms_norm: bool = True
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        try:
            for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
                check_positive_int(name, getattr(self, name))
            check_nonnegative_int("d_intermediate (0: no MLP)", self.d_intermediate)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.norm_epsilon > 0:
            raise ConfigError(f"norm_epsilon must be > 0; got {self.norm_epsilon!r}")
        self.attn_layer_idx = list(self.attn_layer_idx or [])
        # Tuples become lists, as they come back from config.json, so that a saved
        # and reloaded config compares equal to the one it was saved from.
        self.ssm_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in (self.ssm_cfg or {}).items()}
        self.attn_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in (self.attn_cfg or {}).items()}
        ssm_layer = self.ssm_cfg.get("layer", "Mamba1")
        if ssm_layer not in SSM_LAYERS:
            raise ConfigError(f"ssm_cfg['layer'] must be one of {SSM_LAYERS}; got {ssm_layer!r}")
        if self.layer_pattern is not None and self.attn_layer_idx:
            raise ConfigError("give either layer_pattern or attn_layer_idx, not both")
        self.layer_types()  # validates the pattern / indices

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to pad_vocab_size_multiple: the embedding's row count, as in mamba_ssm."""
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def layer_types(self) -> list[str]:
        """The layer at each index: "Mamba1", "Mamba2" or "Attention"."""
        ssm_layer = self.ssm_cfg.get("layer", "Mamba1")
        if self.layer_pattern is not None:
            pattern = self.layer_pattern
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"layer_pattern must be a non-empty string; got {pattern!r}")
            bad = sorted(set(pattern) - set(LAYER_CHARS) - {"M"})
            if bad:
                raise ConfigError(
                    f"layer_pattern {pattern!r} has unknown characters {bad}: use M (the ssm_cfg layer), "
                    "1 (Mamba-1), 2 (Mamba-2) or A (attention)"
                )
            if self.n_layer % len(pattern):
                raise ConfigError(
                    f"layer_pattern {pattern!r} (length {len(pattern)}) must repeat a whole number of times "
                    f"in n_layer={self.n_layer}"
                )
            chars = pattern * (self.n_layer // len(pattern))
            return [ssm_layer if c == "M" else LAYER_CHARS[c] for c in chars]
        bad = [i for i in self.attn_layer_idx if not isinstance(i, int) or not 0 <= i < self.n_layer]
        if bad:
            raise ConfigError(f"attn_layer_idx must hold layer indices in [0, {self.n_layer}); got {bad}")
        attn = set(self.attn_layer_idx)
        return ["Attention" if i in attn else ssm_layer for i in range(self.n_layer)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MambaLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MambaLMConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, path: Union[str, Path]) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "MambaLMConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# Sizes of the incumbent's released 130M models (state-spaces/mamba-130m, mamba2-130m);
# "hybrid-130m" replaces every fourth Mamba-2 layer with attention, "gpt-130m" is a
# Llama-style attention-only stack of about the same parameter count.
_GPT2_VOCAB = 50277
PRESETS: dict[str, dict[str, Any]] = {
    "mamba-130m": dict(d_model=768, n_layer=24, vocab_size=_GPT2_VOCAB, ssm_cfg={"layer": "Mamba1"}),
    "mamba2-130m": dict(d_model=768, n_layer=24, vocab_size=_GPT2_VOCAB, ssm_cfg={"layer": "Mamba2"}),
    "hybrid-130m": dict(
        d_model=768,
        n_layer=24,
        vocab_size=_GPT2_VOCAB,
        layer_pattern="MMMA",
        ssm_cfg={"layer": "Mamba2"},
        attn_cfg={"num_heads": 12, "head_dim": 64, "rotary_emb_dim": 64},
    ),
    "gpt-130m": dict(
        d_model=768,
        n_layer=12,
        vocab_size=_GPT2_VOCAB,
        d_intermediate=2048,
        layer_pattern="A",
        attn_cfg={"num_heads": 12, "head_dim": 64, "rotary_emb_dim": 64},
    ),
}


# About 1M parameters with the byte tokenizer's 257 tokens: for demos, tests and
# the training smoke runs, where 60 steps on 2 cores take well under a minute.
_BYTE_VOCAB = 257
_TINY_ATTN = {"num_heads": 4, "head_dim": 32, "rotary_emb_dim": 32}
_TINY_MAMBA2 = {"layer": "Mamba2", "d_state": 32, "headdim": 32, "chunk_size": 64}
PRESETS.update(
    {
        "mamba-tiny": dict(d_model=128, n_layer=8, vocab_size=_BYTE_VOCAB, ssm_cfg={"layer": "Mamba1"}),
        "mamba2-tiny": dict(d_model=128, n_layer=8, vocab_size=_BYTE_VOCAB, ssm_cfg=_TINY_MAMBA2),
        "hybrid-tiny": dict(
            d_model=128, n_layer=8, vocab_size=_BYTE_VOCAB, layer_pattern="MMMA", ssm_cfg=_TINY_MAMBA2, attn_cfg=_TINY_ATTN
        ),
        "gpt-tiny": dict(
            d_model=128, n_layer=5, vocab_size=_BYTE_VOCAB, d_intermediate=384, layer_pattern="A", attn_cfg=_TINY_ATTN
        ),
    }
)

