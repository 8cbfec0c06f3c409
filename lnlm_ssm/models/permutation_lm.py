"""PermutationLM: XLNet, the permutation language model of two-stream relative attention.

A stack of post-norm blocks (``layers.two_stream_attention`` then a feed-forward,
each ``LayerNorm(x + f(x))``) over a content stream and, when ``target_mapping``
is given, a query stream that starts from the learned ``mask_emb`` at each
prediction. The factorisation order enters only through ``perm_mask``; positions
are relative sinusoids, segments a same/different bias (``seg_embed``); the
content of the previous segment can be given as ``mems`` (Transformer-XL).

Parameter names are HF ``XLNetLMHeadModel``'s, so its checkpoints load as is::

    transformer.word_embedding.weight            (vocab_size, d_model)
    transformer.mask_emb                         (1, 1, d_model)
    transformer.layer.{i}.rel_attn.*             see layers.two_stream_attention
    transformer.layer.{i}.ff.layer_1 / layer_2 / layer_norm
    lm_loss.weight (tied to the embedding when tie_embeddings), lm_loss.bias
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.checkpoint.convert import hf_xlnet
from lnlm_ssm.layers.embedding import TokenEmbedding
from lnlm_ssm.layers.norm import LayerNorm
from lnlm_ssm.layers.two_stream_attention import TwoStreamRelativeAttention, relative_sinusoid
from lnlm_ssm.models import registry
from lnlm_ssm.models.base import PretrainedModel
from lnlm_ssm.models.config import ConfigError
from lnlm_ssm.models.heads import IGNORE_INDEX
from lnlm_ssm.ops._backends import backend_for
from lnlm_ssm.utils.checks import check_nonnegative_int, check_positive_int
from lnlm_ssm.utils.dtypes import math_dtype
from lnlm_ssm.utils.files import atomic_write

__all__ = ["PermutationLM", "PermutationLMConfig", "PermutationLMOutput"]

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class PermutationLMConfig:
    """What a PermutationLM is made of; field names as in HF's XLNetConfig.

    ``d_head`` defaults to ``d_model // n_head``. ``untie_r``: every layer has its
    own ``r_w_bias``, ``r_r_bias`` and ``r_s_bias`` (False: layer 0's are shared
    by all). ``mem_len``: how many positions of content ``forward`` returns as
    ``mems`` for the next segment (0: none). ``clamp_len > 0`` clamps relative
    distances to it.
    """

    vocab_size: int = 32000
    d_model: int = 1024
    n_layer: int = 24
    n_head: int = 16
    d_head: Optional[int] = None
    d_inner: int = 4096
    ff_activation: str = "gelu"
    untie_r: bool = True
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    mem_len: int = 0
    clamp_len: int = -1
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        try:
            for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_inner"):
                check_positive_int(name, getattr(self, name))
            if self.d_head is None:
                if self.d_model % self.n_head:
                    raise ValueError(
                        f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head}), or give d_head"
                    )
                self.d_head = self.d_model // self.n_head
            check_positive_int("d_head", self.d_head)
            check_nonnegative_int("mem_len (0: no memory)", self.mem_len)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.ff_activation not in ACTIVATIONS:
            raise ConfigError(f"ff_activation must be one of {sorted(ACTIVATIONS)}; got {self.ff_activation!r}")
        if not isinstance(self.clamp_len, int):
            raise ConfigError(f"clamp_len must be an int (<= 0: no clamping); got {self.clamp_len!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1); got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be > 0; got {self.layer_norm_eps!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PermutationLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown PermutationLMConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, path: Union[str, Path]) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


@dataclass
class PermutationLMOutput:
    """``logits`` (batch, num_predict or seqlen, vocab_size); ``loss`` when labels were given; ``mems``: per layer
    (batch, <= mem_len, d_model), the content to give the next segment (None when ``mem_len`` is 0)."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    mems: Optional[list[torch.Tensor]] = None


class _FeedForward(nn.Module):
    """``LayerNorm(x + layer_2(act(layer_1(x))))``."""

    def __init__(self, config: PermutationLMConfig, factory: dict, backend: str) -> None:
        super().__init__()
        self.layer_norm = LayerNorm(config.d_model, eps=config.layer_norm_eps, backend=backend, **factory)
        self.layer_1 = nn.Linear(config.d_model, config.d_inner, **factory)
        self.layer_2 = nn.Linear(config.d_inner, config.d_model, **factory)
        self.activation = ACTIVATIONS[config.ff_activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.layer_2(self.dropout(self.activation(self.layer_1(x)))))
        return self.layer_norm(out, residual=x)


class _Layer(nn.Module):
    def __init__(self, config: PermutationLMConfig, factory: dict, backend: str) -> None:
        super().__init__()
        self.rel_attn = TwoStreamRelativeAttention(
            config.d_model,
            config.n_head,
            config.d_head,
            layer_norm_eps=config.layer_norm_eps,
            dropout=config.dropout,
            backend=backend,
            **factory,
        )
        self.ff = _FeedForward(config, factory, backend)


class _Transformer(nn.Module):
    def __init__(self, config: PermutationLMConfig, factory: dict, backend: str) -> None:
        super().__init__()
        self.word_embedding = TokenEmbedding(config.vocab_size, config.vocab_size, config.d_model, **factory)
        self.mask_emb = nn.Parameter(torch.empty(1, 1, config.d_model, **factory))
        self.layer = nn.ModuleList(_Layer(config, factory, backend) for _ in range(config.n_layer))
        self.dropout = nn.Dropout(config.dropout)


_SHARED_BIASES = ("r_w_bias", "r_r_bias", "r_s_bias")


class PermutationLM(PretrainedModel):
    """XLNet's permutation LM (HF ``XLNetLMHeadModel``'s computation with ``attn_type="bi"``, ``bi_data=False``).

    Train it with ``objectives.PLMObjective``; ``data.permutation`` draws the
    ``perm_mask`` and ``target_mapping`` of random factorisation orders. ``backend``
    is passed to the layer norms (the only ops here with kernels; "cpu" runs their PyTorch one).
    """

    architecture = "PermutationLM"
    main_weight = "transformer.word_embedding.weight"

    def __init__(self, config: PermutationLMConfig, *, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, PermutationLMConfig):
            raise TypeError(f"config must be a PermutationLMConfig; got {type(config).__name__}")
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.backend = backend
        self.transformer = _Transformer(config, factory, backend_for("layer_norm_fn", backend))
        self.lm_loss = nn.Linear(config.d_model, config.vocab_size, **factory)
        if config.tie_embeddings:
            self.lm_loss.weight = self.transformer.word_embedding.weight
        if not config.untie_r:
            first = self.transformer.layer[0].rel_attn
            for layer in self.transformer.layer[1:]:
                for name in _SHARED_BIASES:
                    setattr(layer.rel_attn, name, getattr(first, name))
        self._init_weights()

    def tied_weights(self) -> dict[str, str]:
        tied = {"lm_loss.weight": "transformer.word_embedding.weight"} if self.config.tie_embeddings else {}
        if not self.config.untie_r:
            for i in range(1, self.config.n_layer):
                for name in _SHARED_BIASES:
                    tied[f"transformer.layer.{i}.rel_attn.{name}"] = f"transformer.layer.0.rel_attn.{name}"
        return tied

    def _init_weights(self, std: float = 0.02) -> None:
        """XLNet's: every weight, the mask embedding and the attention tensors ~ N(0, std); biases 0, norms 1."""
        with torch.no_grad():
            nn.init.normal_(self.transformer.word_embedding.weight, std=std)
            nn.init.normal_(self.transformer.mask_emb, std=std)
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=std)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, TwoStreamRelativeAttention):
                    module.reset_parameters(std)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        perm_mask: Optional[torch.Tensor] = None,
        target_mapping: Optional[torch.Tensor] = None,
        mems: Optional[Sequence[torch.Tensor]] = None,
        labels: Optional[torch.Tensor] = None,
    ) -> PermutationLMOutput:
        """Logits (and loss) of ``input_ids`` (batch, seqlen); the arguments mean what they mean to HF's XLNet.

        - ``token_type_ids`` (batch, seqlen): segment ids (memory counts as segment 0);
        - ``attention_mask`` (batch, seqlen): 1 real, 0 padding (no position sees a padded one);
        - ``perm_mask`` (batch, seqlen, seqlen): 1 where position i may not see position j;
        - ``target_mapping`` (batch, num_predict, seqlen): 1 where prediction k is at position j;
          the logits are then the query stream's, one row per prediction;
        - ``mems``: per layer (batch, mlen, d_model), the ``mems`` of the previous segment;
        - ``labels`` (batch, num_predict) with ``target_mapping``, else (batch, seqlen): the
          loss is their mean cross entropy, unshifted, ignoring -100.
        """
        config = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a tensor of shape (batch, seqlen >= 1); got {got}")
        batch, qlen = input_ids.shape
        device = input_ids.device
        _check_shape("token_type_ids", token_type_ids, (batch, qlen))
        _check_shape("attention_mask", attention_mask, (batch, qlen))
        _check_shape("perm_mask", perm_mask, (batch, qlen, qlen))
        _check_shape("target_mapping", target_mapping, (batch, "num_predict", qlen))
        mems = self._check_mems(mems, batch)
        mlen = 0 if mems is None else mems[0].shape[1]

        transformer = self.transformer
        h = transformer.dropout(transformer.word_embedding(input_ids))
        g = None
        if target_mapping is not None:
            g = transformer.dropout(transformer.mask_emb.expand(batch, target_mapping.shape[1], -1))

        mask_g = mask_h = None
        if attention_mask is not None or perm_mask is not None:
            hidden = torch.zeros((batch, qlen, qlen), dtype=torch.bool, device=device)
            if attention_mask is not None:
                hidden = hidden | (attention_mask == 0)[:, None, :].to(device)
            if perm_mask is not None:
                hidden = hidden | (perm_mask > 0).to(device)
            # The memory is always visible; the content stream always sees its own token.
            mask_g = F.pad(hidden, (mlen, 0), value=False)
            mask_h = F.pad(hidden & ~torch.eye(qlen, dtype=torch.bool, device=device), (mlen, 0), value=False)
        seg_mat = None
        if token_type_ids is not None:
            key_types = F.pad(token_type_ids, (mlen, 0), value=0)
            seg_mat = token_type_ids[:, :, None] != key_types[:, None, :]
        pos_emb = transformer.dropout(
            relative_sinusoid(qlen, mlen + qlen, config.d_model, config.clamp_len, device=device, dtype=h.dtype)
        )

        new_mems = [] if config.mem_len > 0 else None
        for i, layer in enumerate(transformer.layer):
            prev = None if mems is None else mems[i]
            if new_mems is not None:
                kept = h if prev is None else torch.cat([prev, h], dim=1)
                new_mems.append(kept[:, -config.mem_len:].detach())
            h, g = layer.rel_attn(
                h, g, pos_emb, mask_h=mask_h, mask_g=mask_g, seg_mat=seg_mat, mems=prev, target_mapping=target_mapping
            )
            h = layer.ff(h)
            g = None if g is None else layer.ff(g)

        logits = self.lm_loss(transformer.dropout(h if g is None else g))
        loss = None
        if labels is not None:
            _check_shape("labels", labels, tuple(logits.shape[:2]))
            flat = logits.flatten(0, 1)
            loss = F.cross_entropy(
                flat.to(math_dtype(flat.dtype)), labels.flatten().long().to(device), ignore_index=IGNORE_INDEX
            )
        return PermutationLMOutput(logits=logits, loss=loss, mems=new_mems)

    def _check_mems(self, mems, batch: int) -> Optional[list[torch.Tensor]]:
        if mems is None:
            return None
        n_layer, d_model = self.config.n_layer, self.config.d_model
        if not isinstance(mems, (list, tuple)) or len(mems) != n_layer:
            raise ValueError(
                f"mems must be a list of n_layer={n_layer} tensors (the previous output's mems); got {mems!r:.80}"
            )
        for i, mem in enumerate(mems):
            _check_shape(f"mems[{i}]", mem, (batch, "mlen", d_model))
        lengths = {mem.shape[1] for mem in mems}
        if len(lengths) > 1:
            raise ValueError(f"mems must all hold the same number of positions; got {sorted(lengths)}")
        return list(mems)


def _check_shape(name: str, value: Optional[torch.Tensor], shape: tuple) -> None:
    """``value`` is None or a tensor of ``shape``, where a str entry names a size that may be anything."""
    if value is None:
        return
    if not (
        isinstance(value, torch.Tensor)
        and value.ndim == len(shape)
        and all(isinstance(want, str) or got == want for got, want in zip(value.shape, shape))
    ):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a tensor of shape ({', '.join(map(str, shape))}); got {got}")


# About 1M parameters with the byte tokenizer and 4 special tokens (261 ids).
PRESETS: dict[str, dict[str, Any]] = {
    "xlnet-tiny": dict(vocab_size=261, d_model=128, n_layer=4, n_head=4, d_inner=512, dropout=0.0, mem_len=0),
}

registry.register(PermutationLM, PermutationLMConfig, converters=(hf_xlnet.CONVERTER,), presets=PRESETS)
