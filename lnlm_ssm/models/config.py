"""The model configs and presets: MambaLMConfig (below), EncoderConfig and ElectraConfig (the encoders, at the end).

MambaLMConfig: what a MambaLM is made of, field names as in mamba_ssm's MambaConfig.

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
``ssm_cfg`` layer elsewhere). Every block has an MLP after its mixer when
``d_intermediate > 0``: gated (mamba_ssm's and Llama's SwiGLU, ``mlp_type``
"gated") or plain fc1 -> act -> fc2 (GPT-2's, "plain"), with the activation
``mlp_act`` (a name in ``layers.mlp.ACTIVATIONS``) and biases when ``mlp_bias``.
``max_position_embeddings > 0`` adds learned absolute positions to the token
embedding (GPT-2). ``ssm_cfg`` and ``attn_cfg`` hold the keyword arguments
of the layer constructors (mamba_ssm's names: d_state, d_conv, expand, headdim,
...; num_heads, num_heads_kv, head_dim, rotary_emb_dim, ...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from lnlm_ssm.layers.mlp import ACTIVATIONS
from lnlm_ssm.utils.checks import check_bool, check_choice, check_nonnegative_int, check_positive_int
from lnlm_ssm.utils.files import atomic_write

LAYER_CHARS = {"1": "Mamba1", "2": "Mamba2", "A": "Attention"}
SSM_LAYERS = ("Mamba1", "Mamba2")
MLP_TYPES = ("gated", "plain")


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
    max_position_embeddings: int = 0
    mlp_type: str = "gated"
    mlp_act: str = "silu"
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        try:
            for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
                check_positive_int(name, getattr(self, name))
            check_nonnegative_int("d_intermediate (0: no MLP)", self.d_intermediate)
            check_nonnegative_int("max_position_embeddings (0: no learned positions)", self.max_position_embeddings)
            check_choice("mlp_type", self.mlp_type, MLP_TYPES)
            check_choice("mlp_act", self.mlp_act, sorted(ACTIVATIONS))
            for name in ("rms_norm", "residual_in_fp32", "tie_embeddings", "mlp_bias"):
                check_bool(name, getattr(self, name))
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
# GPT-2's architecture at the tiny size: learned positions (up to 1024, GPT-2's n_positions),
# LayerNorms, biased attention and a plain GELU MLP.
PRESETS["gpt2-tiny"] = dict(
    d_model=128,
    n_layer=4,
    vocab_size=_BYTE_VOCAB,
    d_intermediate=512,
    layer_pattern="A",
    attn_cfg={"num_heads": 4, "head_dim": 32, "qkv_proj_bias": True, "out_proj_bias": True},
    rms_norm=False,
    max_position_embeddings=1024,
    mlp_type="plain",
    mlp_act="gelu_new",
    mlp_bias=True,
)



@dataclass
class EncoderConfig:
    """What a bidirectional encoder is made of: BERT, RoBERTa, ALBERT and ELECTRA are choices of these fields.

    Field names as HF BERT's where ours has the same meaning (``vocab_size``,
    ``hidden_act``, ``max_position_embeddings``, ``type_vocab_size``,
    ``layer_norm_eps``, ``pad_token_id``, ALBERT's ``embedding_size``,
    ``num_hidden_groups``, ``inner_group_num``), MambaLMConfig's otherwise.

    - ``layer_pattern``: one character per distinct block, repeated to their
      number; ``models.encoder.ENCODER_MIXERS`` maps each character to its mixer
      ("A": bidirectional attention). ``mixer_cfg[char]``: that mixer's keyword
      arguments, on top of the defaults (attention: ``num_heads``, no causal mask).
    - ``prenorm``: ``x + mixer(norm(x))`` blocks with a final norm; BERT's
      blocks are post-norm, ``norm(x + mixer(x))`` (False).
    - ``position_offset``: 0, BERT: positions are 0, 1, ...; RoBERTa's
      ``pad_token_id + 1``: the real (non-pad) tokens count up from it and pad
      tokens take ``position_offset - 1``. ``max_position_embeddings`` 0: no position table.
    - ``embedding_size``: the embeddings' width E, mapped to d_model by a linear
      layer (ALBERT always has it, ELECTRA when E != d_model); None: d_model, no map.
    - ``num_hidden_groups`` (None: ``n_layer``, no sharing) groups of
      ``inner_group_num`` blocks; layer i runs group ``i // (n_layer / groups)``
      (ALBERT's cross-layer sharing; ALBERT's own default is 1 group).
    - ``head_act``: the activation of the MLM head's transform (BERT and ALBERT
      use ``hidden_act``; RoBERTa and ELECTRA's generator GELU).
    - ``hidden_dropout``: dropout on the embeddings and on each block's mixer and
      MLP outputs, in training (BERT's hidden_dropout_prob; its dropout of the
      attention probabilities is not built).
    - ``add_pooler``: the bare ``Encoder`` has BERT's pooler (tanh(dense(first token))).
    """

    vocab_size: int = 30522
    d_model: int = 768
    n_layer: int = 12
    num_heads: int = 12
    d_intermediate: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_offset: int = 0
    embedding_size: Optional[int] = None
    num_hidden_groups: Optional[int] = None
    inner_group_num: int = 1
    layer_pattern: str = "A"
    mixer_cfg: dict[str, dict[str, Any]] = field(default_factory=dict)
    prenorm: bool = False
    hidden_dropout: float = 0.1
    head_act: str = "gelu"
    tie_embeddings: bool = True
    add_pooler: bool = False

    def __post_init__(self) -> None:
        try:
            for name in ("vocab_size", "d_model", "n_layer", "num_heads", "d_intermediate", "inner_group_num"):
                check_positive_int(name, getattr(self, name))
            for name in ("max_position_embeddings", "type_vocab_size", "pad_token_id", "position_offset"):
                check_nonnegative_int(name, getattr(self, name))
            if self.embedding_size is not None:
                check_positive_int("embedding_size (None: d_model)", self.embedding_size)
            if self.num_hidden_groups is not None:
                check_positive_int("num_hidden_groups (None: n_layer)", self.num_hidden_groups)
            for name in ("hidden_act", "head_act"):
                check_choice(name, getattr(self, name), sorted(ACTIVATIONS))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be > 0; got {self.layer_norm_eps!r}")
        if not 0 <= self.hidden_dropout < 1:
            raise ConfigError(f"hidden_dropout must be in [0, 1); got {self.hidden_dropout!r}")
        if self.pad_token_id >= self.vocab_size:
            raise ConfigError(f"pad_token_id must be < vocab_size={self.vocab_size}; got {self.pad_token_id}")
        if self.n_layer % self.hidden_groups:
            raise ConfigError(
                f"num_hidden_groups ({self.num_hidden_groups}) must divide n_layer ({self.n_layer}): "
                "each group serves the same number of consecutive layers"
            )
        if not isinstance(self.layer_pattern, str) or not self.layer_pattern:
            raise ConfigError(f"layer_pattern must be a non-empty string; got {self.layer_pattern!r}")
        if self.num_blocks % len(self.layer_pattern):
            raise ConfigError(
                f"layer_pattern {self.layer_pattern!r} (length {len(self.layer_pattern)}) must repeat a whole number "
                f"of times in the {self.num_blocks} distinct blocks (num_hidden_groups * inner_group_num)"
            )
        if not isinstance(self.mixer_cfg, dict) or not all(isinstance(v, dict) for v in self.mixer_cfg.values()):
            raise ConfigError(f"mixer_cfg must map layer characters to dicts of keyword arguments; got {self.mixer_cfg!r}")
        # As MambaLMConfig: tuples become lists, as they come back from config.json.
        self.mixer_cfg = {
            char: {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
            for char, kwargs in self.mixer_cfg.items()
        }

    @property
    def hidden_groups(self) -> int:
        return self.n_layer if self.num_hidden_groups is None else self.num_hidden_groups

    @property
    def num_blocks(self) -> int:
        """How many distinct blocks (parameter sets) the layers share: num_hidden_groups * inner_group_num."""
        return self.hidden_groups * self.inner_group_num

    @property
    def embedding_dim(self) -> int:
        return self.d_model if self.embedding_size is None else self.embedding_size

    def layer_chars(self) -> list[str]:
        """The layer-pattern character of each distinct block."""
        return list(self.layer_pattern * (self.num_blocks // len(self.layer_pattern)))

    def block_order(self) -> list[int]:
        """The distinct block each of the ``n_layer * inner_group_num`` block applications runs, in order."""
        per_group = self.n_layer // self.hidden_groups
        return [
            (i // per_group) * self.inner_group_num + j for i in range(self.n_layer) for j in range(self.inner_group_num)
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderConfig":
        return _from_dict(cls, data)

    def save(self, path: Union[str, Path]) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "EncoderConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _from_dict(cls, data: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
    return cls(**data)


def electra_generator_config(discriminator: EncoderConfig, size: float = 0.25) -> EncoderConfig:
    """ELECTRA's generator for ``discriminator``: ``size`` of its width (d_model, heads, d_intermediate), its depth.

    The embeddings are the discriminator's (shared), so their width E stays the
    discriminator's and the generator maps E to its own d_model.
    """
    if not 0 < size <= 1:
        raise ConfigError(f"size must be in (0, 1]; got {size!r}")
    num_heads = max(1, round(discriminator.num_heads * size))
    head_dim = discriminator.d_model // discriminator.num_heads
    return dataclasses.replace(
        discriminator,
        d_model=num_heads * head_dim,
        num_heads=num_heads,
        d_intermediate=max(1, round(discriminator.d_intermediate * size)),
        embedding_size=discriminator.embedding_dim,
        add_pooler=False,
    )


@dataclass
class ElectraConfig:
    """ELECTRA's pre-training pair: a generator MaskedLM and a discriminator sharing their embeddings.

    ``generator`` defaults to ``electra_generator_config(discriminator)`` (1/4 of
    the discriminator's width, as the paper's small and large models). Both are
    dicts in config.json. ``vocab_size``, when given, replaces both configs' (they
    share the token embedding); it then reads back as the discriminator's.
    """

    discriminator: EncoderConfig = field(default_factory=EncoderConfig)
    generator: Optional[EncoderConfig] = None
    vocab_size: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.discriminator, dict):
            self.discriminator = EncoderConfig.from_dict(self.discriminator)
        if isinstance(self.generator, dict):
            self.generator = EncoderConfig.from_dict(self.generator)
        if self.vocab_size is not None:
            # One vocabulary for both: they share the token embedding.
            self.discriminator = dataclasses.replace(self.discriminator, vocab_size=self.vocab_size)
            if isinstance(self.generator, EncoderConfig):
                self.generator = dataclasses.replace(self.generator, vocab_size=self.vocab_size)
        if self.generator is None:
            self.generator = electra_generator_config(self.discriminator)
        for name in ("discriminator", "generator"):
            if not isinstance(getattr(self, name), EncoderConfig):
                raise ConfigError(f"{name} must be an EncoderConfig or its dict; got {type(getattr(self, name)).__name__}")
        self.vocab_size = self.discriminator.vocab_size
        shared = ("vocab_size", "embedding_dim", "max_position_embeddings", "type_vocab_size", "position_offset",
                  "pad_token_id", "layer_norm_eps")
        differ = [f"{n} ({getattr(self.generator, n)} != {getattr(self.discriminator, n)})" for n in shared
                  if getattr(self.generator, n) != getattr(self.discriminator, n)]
        if differ:
            raise ConfigError(f"the generator shares the discriminator's embeddings, so these must agree: {differ}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "discriminator": self.discriminator.to_dict(), "generator": self.generator.to_dict(),
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ElectraConfig":
        return _from_dict(cls, data)

    def save(self, path: Union[str, Path]) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ElectraConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# The encoders' tiny presets: about 1M parameters with the byte tokenizer's 257 ids and its
# [PAD] (257), [MASK], [CLS] and [SEP] above them. roberta-tiny is BERT with RoBERTa's
# choices for a model trained here: one token type and the GELU head; its positions start
# at 0 (RoBERTa's offset of pad_token_id + 1 only matters for reading its checkpoints).
# Each family registers its own (models.registry): ENCODER_PRESETS are MaskedLM's.
_BYTE_SPECIAL_VOCAB = _BYTE_VOCAB + 4
_BYTE_PAD = _BYTE_VOCAB
_TINY_ENCODER = dict(
    vocab_size=_BYTE_SPECIAL_VOCAB, d_model=128, n_layer=4, num_heads=4, d_intermediate=512, pad_token_id=_BYTE_PAD
)
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "bert-tiny": _TINY_ENCODER,
    "roberta-tiny": dict(_TINY_ENCODER, type_vocab_size=1),
    # BERT-base, with its WordPiece vocabulary of 30522: 110M parameters.
    "bert-110m": dict(vocab_size=30522),
}
# The same blocks with an SSM mixer in place of attention (models.encoder.ENCODER_MIXERS: "B" BiMamba,
# "H" Hydra), pre-norm as Caduceus and Hydra train them, without a position table (the scans and convs
# know the order, as in Caduceus; so no length limit either). BiMamba runs Mamba-2 both ways with its in/out
# projections tied (Caduceus' bidirectional_weight_tie). The 110m depths are chosen so that the parameter
# counts match bert-110m's (a BiMamba or Hydra block has ~20% more parameters than BERT's).
_TINY_SSD = dict(d_state=32, headdim=32, chunk_size=64)
_BASE_SSD = dict(d_state=64, headdim=64, chunk_size=256)
ENCODER_PRESETS.update(
    {
        "bimamba-tiny": dict(
            _TINY_ENCODER, layer_pattern="B", prenorm=True, max_position_embeddings=0,
            mixer_cfg={"B": dict(inner="Mamba2", bidirectional_weight_tie=True, **_TINY_SSD)},
        ),
        "hydra-tiny": dict(
            _TINY_ENCODER, layer_pattern="H", prenorm=True, max_position_embeddings=0, mixer_cfg={"H": _TINY_SSD}
        ),
        "bimamba-110m": dict(
            vocab_size=30522, n_layer=10, layer_pattern="B", prenorm=True, max_position_embeddings=0,
            mixer_cfg={"B": dict(inner="Mamba2", bidirectional_weight_tie=True, **_BASE_SSD)},
        ),
        "hydra-110m": dict(
            vocab_size=30522, n_layer=10, layer_pattern="H", prenorm=True, max_position_embeddings=0,
            mixer_cfg={"H": _BASE_SSD},
        ),
    }
)
# One block shared by all 6 layers, on 64-wide embeddings: ALBERT's two savings (SentenceOrderMaskedLM's).
ALBERT_PRESETS: dict[str, dict[str, Any]] = {
    "albert-tiny": dict(
        _TINY_ENCODER, d_model=256, n_layer=6, d_intermediate=1024, embedding_size=64, num_hidden_groups=1,
        hidden_act="gelu_new", head_act="gelu_new", hidden_dropout=0.0,
    ),
}
# The discriminator is bert-tiny; the generator, by default, a quarter of its width (ElectraPretraining's).
ELECTRA_PRESETS: dict[str, dict[str, Any]] = {"electra-tiny": dict(discriminator=dict(_TINY_ENCODER))}
