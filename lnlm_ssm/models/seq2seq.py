"""Seq2SeqLM: an encoder-decoder language model (T5), whose decoder may mix attention with Mamba layers.

T5 (Raffel et al. 2020) as a config of choices:

- pre-norm blocks, ``x + sublayer(norm(x))``, RMS norms without mean or bias, a
  final norm after each stack;
- encoder block: self-attention (bidirectional) and a feed-forward;
- decoder block: a causal self-mixer, cross-attention to the encoder's output,
  and a feed-forward;
- attention without the 1/sqrt(head_dim) scaling and without biases, plus a
  relative position bias (``layers.position_bias``) that each stack computes
  once for all its attention layers: bidirectional in the encoder, one-sided in
  the decoder;
- the feed-forward ``relu`` (T5 v1.0) or gated ``gelu_new`` (v1.1), no biases;
- one embedding for the encoder's and decoder's inputs; a head tied to it
  reads the decoder's output scaled by d_model**-0.5.

Each stack's mixers are given by a pattern, one character per layer, repeated
to the stack's depth: ``ENCODER_MIXERS`` and ``DECODER_MIXERS`` map each
character to its mixer (encoder "A": bidirectional attention; decoder "A": causal
attention, "1": Mamba-1, "2": Mamba-2), built with d_model, the defaults of
``mixer_defaults`` and ``mixer_cfg[char]``; a new mixer is one entry there.

Parameter names::

    embedding.weight                              (padded_vocab_size, d_model)
    encoder.position_bias.weight                  (buckets, heads), when the encoder has attention
    encoder.layers.{i}.norm.weight, .mixer.*       BiasedAttention: in_proj (rows [q, k, v]), out_proj
    encoder.layers.{i}.norm2.weight, .mlp.fc1.weight, .mlp.fc2.weight
    encoder.norm_f.weight
    decoder.position_bias.weight                  when the decoder has attention
    decoder.layers.{i}.norm.weight, .mixer.*       BiasedAttention, Mamba or Mamba2
    decoder.layers.{i}.cross_norm.weight, .cross_attn.q_proj / kv_proj (rows [k, v]) / out_proj .weight
    decoder.layers.{i}.norm2.weight, .mlp.fc1.weight, .mlp.fc2.weight
    decoder.norm_f.weight
    lm_head.weight                                the embedding's tensor when tie_embeddings

The gated feed-forward is ``GatedMLP`` (fc1 rows [value, gate]); the ungated one ``MLP``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.checkpoint.convert import hf_t5
from lnlm_ssm.generation.seq2seq import generate as _generate
from lnlm_ssm.layers.biased_attention import BiasedAttention
from lnlm_ssm.layers.bidirectional import BiMamba, Hydra
from lnlm_ssm.layers.cache import Seq2SeqCache
from lnlm_ssm.layers.cross_attention import CrossAttention
from lnlm_ssm.layers.embedding import TokenEmbedding
from lnlm_ssm.layers.mamba import Mamba
from lnlm_ssm.layers.mamba2 import Mamba2
from lnlm_ssm.layers.mlp import ACTIVATIONS, MLP, GatedMLP
from lnlm_ssm.layers.norm import RMSNorm
from lnlm_ssm.layers.position_bias import RelativePositionBias
from lnlm_ssm.layers.quantized import compute_dtype, quantization_of
from lnlm_ssm.models import registry
from lnlm_ssm.models.base import PretrainedModel
from lnlm_ssm.models.config import ConfigError
from lnlm_ssm.models.heads import IGNORE_INDEX, lm_logits
from lnlm_ssm.ops._backends import backend_for
from lnlm_ssm.utils.checks import check_choice, check_nonnegative_int, check_positive_int
from lnlm_ssm.utils.dtypes import math_dtype
from lnlm_ssm.utils.files import atomic_write

__all__ = ["DECODER_MIXERS", "ENCODER_MIXERS", "SEQ2SEQ_PRESETS", "Seq2SeqConfig", "Seq2SeqLM", "Seq2SeqLMOutput"]

# Pattern character -> the mixer of that layer, per stack.
ENCODER_MIXERS: dict[str, type] = {"A": BiasedAttention, "B": BiMamba, "H": Hydra}
DECODER_MIXERS: dict[str, type] = {"A": BiasedAttention, "1": Mamba, "2": Mamba2}
# The mixers that take the stack's relative position bias.
_BIASED = (BiasedAttention,)


@dataclass
class Seq2SeqConfig:
    """What a Seq2SeqLM is made of; the defaults are T5-small's (v1.0).

    - ``encoder_pattern`` / ``decoder_pattern``: one character per layer (see the
      module docstring), repeated to ``n_encoder_layer`` / ``n_decoder_layer``.
    - ``mixer_cfg[char]``: keyword arguments of that character's mixer on top of
      ``mixer_defaults`` (Mamba's d_state, expand, ...; Mamba-2's headdim, ...).
    - ``num_heads``, ``head_dim`` (T5's d_kv): of every attention layer, self and cross.
    - ``ffn_activation`` (a name in ``layers.mlp.ACTIVATIONS``) and ``ffn_gated``:
      T5 v1.0 is "relu" ungated, v1.1 "gelu_new" gated; ``d_ff`` the hidden size.
    - ``relative_attention_num_buckets`` / ``relative_attention_max_distance``: the position bias.
    - ``tie_embeddings``: the head is the embedding; ``scale_decoder_output``:
      the head reads the decoder's output times d_model**-0.5 (None: when tied, as T5).
    - ``pad_token_id`` (replaces -100 in shifted labels), ``eos_token_id`` (ends
      generation; None: nothing does), ``decoder_start_token_id`` (the decoder's first input; T5: pad).
    """

    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 8
    head_dim: int = 64
    d_ff: int = 2048
    n_encoder_layer: int = 6
    n_decoder_layer: int = 6
    encoder_pattern: str = "A"
    decoder_pattern: str = "A"
    mixer_cfg: dict[str, dict[str, Any]] = field(default_factory=dict)
    ffn_activation: str = "relu"
    ffn_gated: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    norm_epsilon: float = 1e-6
    tie_embeddings: bool = True
    scale_decoder_output: Optional[bool] = None
    pad_vocab_size_multiple: int = 8
    pad_token_id: int = 0
    eos_token_id: Optional[int] = 1
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        try:
            for name in (
                "vocab_size", "d_model", "num_heads", "head_dim", "d_ff", "n_encoder_layer", "n_decoder_layer",
                "relative_attention_num_buckets", "relative_attention_max_distance", "pad_vocab_size_multiple",
            ):
                check_positive_int(name, getattr(self, name))
            for name in ("pad_token_id", "decoder_start_token_id", "eos_token_id"):
                if getattr(self, name) is not None:
                    check_nonnegative_int(name, getattr(self, name))
            check_choice("ffn_activation", self.ffn_activation, sorted(ACTIVATIONS))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for name in ("pad_token_id", "decoder_start_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and value >= self.vocab_size:
                raise ConfigError(f"{name} must be < vocab_size={self.vocab_size}; got {value}")
        if not self.norm_epsilon > 0:
            raise ConfigError(f"norm_epsilon must be > 0; got {self.norm_epsilon!r}")
        for name in ("ffn_gated", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool; got {getattr(self, name)!r}")
        if self.scale_decoder_output is None:
            self.scale_decoder_output = self.tie_embeddings
        elif not isinstance(self.scale_decoder_output, bool):
            raise ConfigError(
                f"scale_decoder_output must be a bool or None (when tied); got {self.scale_decoder_output!r}"
            )
        if not isinstance(self.mixer_cfg, dict) or not all(isinstance(v, dict) for v in self.mixer_cfg.values()):
            raise ConfigError(
                f"mixer_cfg must map layer characters to dicts of keyword arguments; got {self.mixer_cfg!r}"
            )
        # Tuples become lists, as they come back from config.json, so a reloaded config compares equal.
        self.mixer_cfg = {
            char: {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
            for char, kwargs in self.mixer_cfg.items()
        }
        self.encoder_layers()  # validate the patterns
        self.decoder_layers()

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to pad_vocab_size_multiple: the embedding's row count."""
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def encoder_layers(self) -> str:
        """The pattern character of each encoder layer."""
        return _expand("encoder_pattern", self.encoder_pattern, self.n_encoder_layer, ENCODER_MIXERS)

    def decoder_layers(self) -> str:
        """The pattern character of each decoder layer."""
        return _expand("decoder_pattern", self.decoder_pattern, self.n_decoder_layer, DECODER_MIXERS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Seq2SeqConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown Seq2SeqConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, path: Union[str, Path]) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Seq2SeqConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _expand(name: str, pattern: Any, n_layer: int, mixers: dict[str, type]) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{name} must be a non-empty string; got {pattern!r}")
    bad = sorted(set(pattern) - set(mixers))
    if bad:
        raise ConfigError(
            f"{name} {pattern!r} has characters {bad} that name no mixer of this stack; known: {sorted(mixers)}"
        )
    if n_layer % len(pattern):
        raise ConfigError(
            f"{name} {pattern!r} (length {len(pattern)}) must repeat a whole number of times in {n_layer} layers"
        )
    return pattern * (n_layer // len(pattern))


# About 1M parameters with the byte tokenizer's 261 ids: the bytes 0..255, eos 256, then the
# specials pad 257 (also the decoder's start, as T5's pad), mask 258, cls 259, sep 260; and above them,
# as ByT5 does, 100 ids for span corruption's sentinels (360 down to 261).
_TINY = dict(
    vocab_size=361, d_model=128, num_heads=4, head_dim=32, d_ff=384, n_encoder_layer=2, n_decoder_layer=2,
    ffn_activation="gelu_new", ffn_gated=True, pad_token_id=257, eos_token_id=256, decoder_start_token_id=257,
)
# The SSM stacks: a Mamba-1 decoder under T5's encoder; Hydra encoding for a Mamba-2 decoder; and a hybrid
# of both with attention, each layer keeping its cross-attention.
_TINY_SSD = dict(d_state=32, headdim=32, chunk_size=64)
SEQ2SEQ_PRESETS: dict[str, dict[str, Any]] = {
    "t5-small": {},
    "t5-tiny": _TINY,
    "mamba-t5-tiny": dict(_TINY, decoder_pattern="1"),
    "hydra-mamba2-t5-tiny": dict(
        _TINY, encoder_pattern="H", decoder_pattern="2", mixer_cfg={"H": _TINY_SSD, "2": _TINY_SSD}
    ),
    "hybrid-t5-tiny": dict(
        _TINY, encoder_pattern="HA", decoder_pattern="2A", mixer_cfg={"H": _TINY_SSD, "2": _TINY_SSD}
    ),
}


def mixer_defaults(config: Seq2SeqConfig, char: str, causal: bool) -> dict[str, Any]:
    """The keyword arguments a mixer gets from the config's own fields; ``mixer_cfg[char]`` overrides them."""
    if char == "A":
        return {"num_heads": config.num_heads, "head_dim": config.head_dim, "softmax_scale": 1.0, "causal": causal}
    return {}


def _make_mixer(config: Seq2SeqConfig, mixers: dict, char: str, causal: bool, layer_idx: int, factory, backend):
    kwargs = {**mixer_defaults(config, char, causal), **config.mixer_cfg.get(char, {})}
    try:
        return mixers[char](config.d_model, **kwargs, layer_idx=layer_idx, backend=backend, **factory)
    except TypeError as err:
        name = mixers[char].__name__
        raise ConfigError(f"the {name} of layer {layer_idx} does not take mixer_cfg[{char!r}]: {err}") from err


def _make_norm(config: Seq2SeqConfig, factory: dict, backend: str) -> RMSNorm:
    return RMSNorm(config.d_model, eps=config.norm_epsilon, backend=backend_for("rms_norm_fn", backend), **factory)


def _make_ffn(config: Seq2SeqConfig, factory: dict) -> nn.Module:
    if config.ffn_gated:
        return GatedMLP(
            config.d_model, hidden_features=config.d_ff, activation=ACTIVATIONS[config.ffn_activation], multiple_of=1,
            **factory,
        )
    return MLP(config.d_model, config.d_ff, activation=config.ffn_activation, bias=False, **factory)


class EncoderBlock(nn.Module):
    """``x + mixer(norm(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: Seq2SeqConfig, char: str, layer_idx: int, *, factory: dict, backend: str):
        super().__init__()
        self.norm = _make_norm(config, factory, backend)
        self.mixer = _make_mixer(config, ENCODER_MIXERS, char, False, layer_idx, factory, backend)
        self.norm2 = _make_norm(config, factory, backend)
        self.mlp = _make_ffn(config, factory)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], position_bias: Optional[torch.Tensor]):
        extra = {"position_bias": position_bias} if isinstance(self.mixer, _BIASED) else {}
        x = x + self.mixer(self.norm(x), mask=mask, **extra)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """``x + mixer(norm(x))``, ``x + cross_attn(cross_norm(x), memory)``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: Seq2SeqConfig, char: str, layer_idx: int, *, factory: dict, backend: str):
        super().__init__()
        self.norm = _make_norm(config, factory, backend)
        self.mixer = _make_mixer(config, DECODER_MIXERS, char, True, layer_idx, factory, backend)
        self.cross_norm = _make_norm(config, factory, backend)
        self.cross_attn = CrossAttention(
            config.d_model, config.num_heads, head_dim=config.head_dim, softmax_scale=1.0, backend=backend, **factory
        )
        self.norm2 = _make_norm(config, factory, backend)
        self.mlp = _make_ffn(config, factory)

    def forward(self, x, memory, cache, mask, position_bias):
        extra = {"position_bias": position_bias} if isinstance(self.mixer, _BIASED) else {}
        x = x + self.mixer(self.norm(x), cache, mask=mask, **extra)
        x = x + self.cross_attn(self.cross_norm(x), memory)
        return x + self.mlp(self.norm2(x))


class _Stack(nn.Module):
    """The blocks of one stack, the relative position bias they share (when one takes it) and the final norm."""

    def __init__(self, config: Seq2SeqConfig, block: type, chars: str, bidirectional: bool, *, factory, backend):
        super().__init__()
        self.layers = nn.ModuleList(block(config, c, i, factory=factory, backend=backend) for i, c in enumerate(chars))
        if any(isinstance(layer.mixer, _BIASED) for layer in self.layers):
            self.position_bias = RelativePositionBias(
                config.num_heads,
                bidirectional=bidirectional,
                num_buckets=config.relative_attention_num_buckets,
                max_distance=config.relative_attention_max_distance,
                **factory,
            )
        else:
            self.position_bias = None
        self.norm_f = _make_norm(config, factory, backend)

    def bias(self, seqlen: int, past: int = 0) -> Optional[torch.Tensor]:
        return None if self.position_bias is None else self.position_bias(seqlen, past + seqlen, past)


class Seq2SeqEncoder(_Stack):
    def __init__(self, config: Seq2SeqConfig, *, factory: dict, backend: str):
        super().__init__(config, EncoderBlock, config.encoder_layers(), True, factory=factory, backend=backend)

    def forward(self, hidden_states: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        bias = self.bias(hidden_states.shape[1])
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, bias)
        return self.norm_f(hidden_states)


class Seq2SeqDecoder(_Stack):
    def __init__(self, config: Seq2SeqConfig, *, factory: dict, backend: str):
        super().__init__(config, DecoderBlock, config.decoder_layers(), False, factory=factory, backend=backend)

    def forward(self, hidden_states, memories: list, caches: Optional[list], mask, past: int) -> torch.Tensor:
        bias = self.bias(hidden_states.shape[1], past)
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, memories[i], None if caches is None else caches[i], mask, bias)
        return self.norm_f(hidden_states)


@dataclass
class Seq2SeqLMOutput:
    """``logits`` (batch, target_len, vocab_size); ``loss`` when labels were given; the encoder's output."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    encoder_hidden_states: Optional[torch.Tensor] = None


def shift_right(labels: torch.Tensor, start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """The decoder's inputs for ``labels`` (batch, target_len): the start token, then the labels but the last,
    with -100 (ignored positions) replaced by the pad token."""
    shifted = torch.cat([labels.new_full((labels.shape[0], 1), start_token_id), labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


class Seq2SeqLM(PretrainedModel):
    """An encoder-decoder language model as ``config`` describes; T5's checkpoints load into it.

    ``backend`` is passed to every op of every layer that has a kernel for it
    (see ``MambaLM``).
    """

    architecture = "Seq2SeqLM"
    main_weight = "embedding.weight"

    def __init__(self, config: Seq2SeqConfig, *, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, Seq2SeqConfig):
            raise TypeError(f"config must be a Seq2SeqConfig; got {type(config).__name__}")
        self.config = config
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.embedding = TokenEmbedding(config.vocab_size, config.padded_vocab_size, config.d_model, **factory)
        self.encoder = Seq2SeqEncoder(config, factory=factory, backend=backend)
        self.decoder = Seq2SeqDecoder(config, factory=factory, backend=backend)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, **factory)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self._init_weights()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Seq2SeqConfig, *, device=None, dtype=None, backend: str = "auto") -> "Seq2SeqLM":
        return cls(config, device=device, dtype=dtype, backend=backend)

    @classmethod
    def from_name(cls, name: str, *, device=None, dtype=None, backend: str = "auto", **overrides: Any) -> "Seq2SeqLM":
        """A randomly initialised model of the preset ``name`` (``SEQ2SEQ_PRESETS``), fields overridden."""
        return cls(registry.preset(name, **overrides), device=device, dtype=dtype, backend=backend)

    def tied_weights(self) -> dict[str, str]:
        if not self.config.tie_embeddings:
            return {}
        tied = {"lm_head.weight": "embedding.weight"}
        if quantization_of(self) == "int8":
            tied["lm_head.weight_scale"] = "embedding.weight_scale"
        return tied

    def _init_weights(self) -> None:
        """T5's initialisation (Mesh TensorFlow's, which takes the place of the 1/sqrt(head_dim) attention scaling).

        Embedding N(0, 1), an untied head N(0, d_model**-0.5) (logits of the tied
        head's scale); q N(0, (d_model * head_dim)**-0.5), k and v N(0, d_model**-0.5),
        the attention output N(0, (num_heads * head_dim)**-0.5); the position bias and
        the feed-forward's input N(0, d_model**-0.5), its output N(0, d_ff**-0.5).
        Mamba mixers keep their own initialisation; norms are ones.
        """
        c = self.config
        with torch.no_grad():
            nn.init.normal_(self.embedding.weight, std=1.0)
            if not c.tie_embeddings:
                nn.init.normal_(self.lm_head.weight, std=c.d_model**-0.5)
            for stack in (self.encoder, self.decoder):
                if stack.position_bias is not None:
                    nn.init.normal_(stack.position_bias.weight, std=c.d_model**-0.5)
                for layer in stack.layers:
                    if isinstance(layer.mixer, BiasedAttention):
                        inner = layer.mixer.num_heads * layer.mixer.head_dim
                        q, kv = layer.mixer.in_proj.weight.split([inner, 2 * inner])
                        nn.init.normal_(q, std=(c.d_model * layer.mixer.head_dim) ** -0.5)
                        nn.init.normal_(kv, std=c.d_model**-0.5)
                        nn.init.normal_(layer.mixer.out_proj.weight, std=inner**-0.5)
                    cross = getattr(layer, "cross_attn", None)
                    if cross is not None:
                        nn.init.normal_(cross.q_proj.weight, std=(c.d_model * c.head_dim) ** -0.5)
                        nn.init.normal_(cross.kv_proj.weight, std=c.d_model**-0.5)
                        nn.init.normal_(cross.out_proj.weight, std=(c.num_heads * c.head_dim) ** -0.5)
                    nn.init.normal_(layer.mlp.fc1.weight, std=c.d_model**-0.5)
                    nn.init.normal_(layer.mlp.fc2.weight, std=c.d_ff**-0.5)

    # -- the two stacks --------------------------------------------------------------------------

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The encoder's output (batch, source_len, d_model) for ``input_ids`` (batch, source_len).

        ``attention_mask`` (batch, source_len): 1 real, 0 padding (anywhere; T5 pads on the right).
        """
        _check_ids("input_ids", input_ids)
        mask = _check_mask("attention_mask", attention_mask, input_ids)
        return self.encoder(self.embedding(input_ids), mask)

    def allocate_cache(
        self, encoder_hidden_states: torch.Tensor, max_seqlen: int, *, attention_mask: Optional[torch.Tensor] = None
    ) -> Seq2SeqCache:
        """The decoder's inference state for up to ``max_seqlen`` decoder positions, reading
        ``encoder_hidden_states`` (batch, source_len, d_model) with its ``attention_mask``.

        Each layer's cross-attention keys and values are computed here, once; the
        self-mixers' caches are allocated zeroed (``decode_step`` fills them).
        """
        check_positive_int("max_seqlen", max_seqlen)
        memories = self._memories(encoder_hidden_states, attention_mask)
        batch = encoder_hidden_states.shape[0]
        device = self.embedding.weight.device
        dtype = compute_dtype(self.embedding)
        layers = [
            layer.mixer.allocate_cache(batch, max_seqlen, device=device, dtype=dtype) for layer in self.decoder.layers
        ]
        return Seq2SeqCache(layers, memories, max_seqlen)

    def decode_step(self, decoder_input_ids: torch.Tensor, cache: Seq2SeqCache) -> torch.Tensor:
        """Logits (batch, seqlen, vocab_size) of ``decoder_input_ids`` (batch, seqlen) continuing ``cache``,
        which takes them in (seqlen 1: each self-mixer's single-step path)."""
        if not isinstance(cache, Seq2SeqCache):
            raise TypeError(f"cache must be a Seq2SeqCache (model.allocate_cache); got {type(cache).__name__}")
        _check_ids("decoder_input_ids", decoder_input_ids)
        batch, seqlen = decoder_input_ids.shape
        if batch != cache.batch_size:
            raise ValueError(f"cache was allocated for batch {cache.batch_size}; decoder_input_ids has batch {batch}")
        if cache.seqlen + seqlen > cache.max_seqlen:
            raise ValueError(
                f"cache has seen {cache.seqlen} of max_seqlen={cache.max_seqlen} decoder positions and cannot take "
                f"{seqlen} more; allocate_cache with a larger max_seqlen"
            )
        hidden = self.decoder(self.embedding(decoder_input_ids), cache.cross, cache.layers, None, cache.seqlen)
        cache.advance(seqlen)
        return self._logits(hidden)

    def _memories(self, encoder_hidden_states, attention_mask) -> list:
        d_model = self.config.d_model
        if (
            not isinstance(encoder_hidden_states, torch.Tensor)
            or encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[2] != d_model
        ):
            raise ValueError(
                f"encoder_hidden_states must be a tensor of shape (batch, source_len, d_model={d_model}); got "
                f"{tuple(getattr(encoder_hidden_states, 'shape', ())) or encoder_hidden_states!r}"
            )
        mask = _check_mask("attention_mask", attention_mask, encoder_hidden_states[..., 0])
        return [layer.cross_attn.memory(encoder_hidden_states, mask) for layer in self.decoder.layers]

    def _logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.config.scale_decoder_output:
            hidden_states = hidden_states * self.config.d_model**-0.5
        return lm_logits(hidden_states, self.lm_head, self.config.vocab_size, self.backend)

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        decoder_attention_mask: Optional[torch.Tensor] = None,
        *,
        encoder_hidden_states: Optional[torch.Tensor] = None,
    ) -> Seq2SeqLMOutput:
        """Logits (and loss) of the decoder reading ``decoder_input_ids`` while attending to the encoded ``input_ids``.

        - ``input_ids`` (batch, source_len) with ``attention_mask`` (1 real, 0 padding),
          or their ``encoder_hidden_states`` from ``encode``, reused;
        - ``labels`` (batch, target_len): the tokens each decoder position predicts,
          -100 where none; the loss is their mean cross entropy. Without
          ``decoder_input_ids`` the decoder reads the labels shifted right
          (``decoder_start_token_id`` first, -100 as pad);
        - ``decoder_attention_mask`` (batch, target_len): 1 real, 0 padding of the
          decoder's inputs (padded keys are hidden from attention; padding on the
          right changes no real position of a causal decoder).
        """
        if decoder_input_ids is None and labels is None:
            raise ValueError("give decoder_input_ids or labels (the decoder reads the labels shifted right)")
        if labels is not None:
            _check_labels(labels, self.config.vocab_size)
        if decoder_input_ids is None:
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        _check_ids("decoder_input_ids", decoder_input_ids)
        if labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(
                f"labels must have decoder_input_ids' shape {tuple(decoder_input_ids.shape)}; got {tuple(labels.shape)}"
            )
        if encoder_hidden_states is None:
            if input_ids is None:
                raise ValueError(
                    "the decoder attends to the encoder's output: give input_ids (batch, source_len) or their "
                    "encoder_hidden_states with decoder_input_ids / labels"
                )
            encoder_hidden_states = self.encode(input_ids, attention_mask)
        elif input_ids is not None:
            raise ValueError("give input_ids or encoder_hidden_states, not both")
        if encoder_hidden_states.shape[0] != decoder_input_ids.shape[0]:
            raise ValueError(
                f"the encoder input has batch {encoder_hidden_states.shape[0]} but decoder_input_ids "
                f"batch {decoder_input_ids.shape[0]}"
            )
        decoder_mask = _check_mask("decoder_attention_mask", decoder_attention_mask, decoder_input_ids)
        memories = self._memories(encoder_hidden_states, attention_mask)
        hidden = self.decoder(self.embedding(decoder_input_ids), memories, None, decoder_mask, 0)
        logits = self._logits(hidden)
        loss = None
        if labels is not None:
            flat = logits.flatten(0, 1)
            loss = F.cross_entropy(
                flat.to(math_dtype(flat.dtype)), labels.to(logits.device).flatten().long(), ignore_index=IGNORE_INDEX
            )
        return Seq2SeqLMOutput(logits=logits, loss=loss, encoder_hidden_states=encoder_hidden_states)

    # -- generation ----------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """The decoder's ids for ``input_ids``; the arguments are ``lnlm_ssm.generation.seq2seq.generate``'s."""
        return _generate(self, input_ids, **kwargs)


def _check_ids(name: str, ids: Any) -> None:
    """``ids`` is an integer (batch, seqlen >= 1) tensor; its values are the embedding's to check."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        got = f"dtype {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an int32/int64 tensor; got {got}")
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape (batch, seqlen >= 1); got {tuple(ids.shape)}")


def _check_labels(labels: Any, vocab_size: int) -> None:
    """``labels`` are ids like ``_check_ids``'s, each in [0, vocab_size) or -100 (checked on CPU tensors)."""
    _check_ids("labels", labels)
    if labels.device.type == "cpu":
        bad = ((labels < 0) | (labels >= vocab_size)) & (labels != IGNORE_INDEX)
        if bad.any():
            raise ValueError(
                f"labels must lie in [0, vocab_size={vocab_size}) or be {IGNORE_INDEX} (ignored); "
                f"got {labels[bad][0].item()}"
            )


def _check_mask(name: str, mask: Any, like: torch.Tensor) -> Optional[torch.Tensor]:
    """``mask`` (None or a (batch, seqlen) tensor of 0/1 like ``like``'s first two dims) as bool."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.shape != like.shape[:2]:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of shape (batch, seqlen) = {tuple(like.shape[:2])}; got {got}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or integer tensor (1 real, 0 padding); got {mask.dtype}")
    return mask.to(device=like.device, dtype=torch.bool)


registry.register(
    Seq2SeqLM, Seq2SeqConfig, converters=(hf_t5.CONVERTER, hf_t5.MT5_CONVERTER), presets=SEQ2SEQ_PRESETS
)
