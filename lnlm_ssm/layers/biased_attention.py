"""Multi-head self-attention whose scores take an additive bias (T5's relative position bias), and the attention
product it shares with cross-attention.

``softmax(q k^T * softmax_scale + bias + hidden) v`` per head, where ``hidden`` is
the float32 minimum where a query may not see a key (a later key when causal, a
padded key) and 0 elsewhere. The minimum rather than -inf keeps a row whose keys
are all hidden finite (its output is then never used). T5 uses ``softmax_scale``
1 (its initialisation scales q instead) and no projection biases. The scores are
added and the softmax taken in fp32 (float64 for float64 inputs).

Parameters: ``in_proj`` d_model -> rows ``[q, k, v]`` (each head-major), ``out_proj``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lnlm_ssm.layers.base import Mixer
from lnlm_ssm.layers.cache import AttentionCache
from lnlm_ssm.layers.quantized import compute_dtype, project
from lnlm_ssm.ops._backends import check_backend
from lnlm_ssm.utils.checks import check_positive_int
from lnlm_ssm.utils.dtypes import math_dtype


def head_size(d_model: int, num_heads: int, head_dim: Optional[int]) -> int:
    """``head_dim``, by default ``d_model // num_heads`` (which must then divide evenly)."""
    check_positive_int("d_model", d_model)
    check_positive_int("num_heads", num_heads)
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by num_heads ({num_heads}) when head_dim is not given"
            )
        head_dim = d_model // num_heads
    return check_positive_int("head_dim", head_dim)


def check_hidden_states(hidden_states, d_model: int) -> None:
    """``hidden_states`` is a (batch, seqlen, d_model) tensor."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 3 or hidden_states.shape[-1] != d_model:
        got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
        raise ValueError(f"hidden_states must be a tensor of shape (batch, seqlen, d_model={d_model}), got {got}")


def hidden_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``visible`` (bool) and the minimum of ``dtype`` elsewhere: an additive attention mask."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


def attend(q, k, v, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` of q (batch, q_len, heads, head_dim) and k, v (batch, k_len, heads,
    head_dim).

    ``bias`` broadcasts to (batch, heads, q_len, k_len); the sum and the softmax are
    in fp32 (float64 for float64). Returns (batch, q_len, heads, head_dim) in v's dtype.
    """
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k).to(math_dtype(q.dtype))
    if scale != 1.0:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


class BiasedAttention(Mixer):
    """Self-attention with an additive score bias, keeping the mixer contract of :mod:`lnlm_ssm.layers`.

    Args:
        num_heads, head_dim: head_dim defaults to ``d_model // num_heads`` (T5's ``d_kv``).
        softmax_scale: default ``head_dim ** -0.5``; T5's is 1.
        causal: a query sees only the keys at or before it (a decoder).
        bias: biases on the projections (T5 has none).

    ``forward(..., position_bias=None)``: the bias (1 or batch, num_heads, seqlen,
    past + seqlen), added to every score; the stack computes it once for all layers.
    ``mask`` marks padded keys, anywhere in the row (encoders pad on the right).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: Optional[int] = None,
        softmax_scale: Optional[float] = None,
        causal: bool = False,
        bias: bool = False,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        head_dim = head_size(d_model, num_heads, head_dim)
        if softmax_scale is not None and not softmax_scale > 0:
            raise ValueError(f"softmax_scale must be positive or None, got {softmax_scale!r}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.softmax_scale = head_dim**-0.5 if softmax_scale is None else float(softmax_scale)
        self.causal = causal
        self.layer_idx = layer_idx
        self.backend = check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        inner = num_heads * head_dim
        self.in_proj = nn.Linear(d_model, 3 * inner, bias=bias, **factory)
        self.out_proj = nn.Linear(inner, d_model, bias=bias, **factory)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, softmax_scale={self.softmax_scale}, "
            f"causal={self.causal}"
        )

    def allocate_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None) -> AttentionCache:
        """Zeroed K and V ``(batch_size, max_seqlen, num_heads, head_dim)``, by default like ``out_proj``."""
        check_positive_int("batch_size", batch_size)
        check_positive_int("max_seqlen", max_seqlen)
        device = self.out_proj.weight.device if device is None else device
        dtype = compute_dtype(self.out_proj) if dtype is None else dtype
        shape = (batch_size, max_seqlen, self.num_heads, self.head_dim)
        return AttentionCache(
            k=torch.zeros(shape, device=device, dtype=dtype), v=torch.zeros(shape, device=device, dtype=dtype)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Optional[AttentionCache] = None,
        *,
        mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        position_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(batch, seqlen, d_model) -> (batch, seqlen, d_model); ``position_ids`` is unused (the bias holds the
        positions)."""
        check_hidden_states(hidden_states, self.d_model)
        batch, seqlen, _ = hidden_states.shape
        past = 0
        if cache is not None:
            if not isinstance(cache, AttentionCache):
                raise TypeError(f"cache must be the AttentionCache from allocate_cache, got {type(cache).__name__}")
            if cache.k.shape[0] != batch or cache.seqlen + seqlen > cache.max_seqlen:
                raise ValueError(
                    f"cache (batch {cache.k.shape[0]}, {cache.seqlen} of max_seqlen={cache.max_seqlen} positions seen) "
                    f"cannot take batch {batch} with {seqlen} more positions"
                )
            past = cache.seqlen
        total = past + seqlen
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != (batch, total)):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a tensor of shape (batch={batch}, past + seqlen={total}), got {got}")
        if position_bias is not None and (
            position_bias.ndim != 4 or position_bias.shape[1:] != (self.num_heads, seqlen, total)
        ):
            raise ValueError(
                f"position_bias must have shape (1 or batch, num_heads={self.num_heads}, seqlen={seqlen}, "
                f"past + seqlen={total}), got {tuple(position_bias.shape)}"
            )

        qkv = project(self.in_proj, hidden_states, self.backend)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)
        if cache is not None:
            cache.k[:, past:total] = k
            cache.v[:, past:total] = v
            cache.seqlen = total
            k, v = cache.k[:, :total].to(q.dtype), cache.v[:, :total].to(q.dtype)

        bias = position_bias
        visible = self._visibility(seqlen, past, mask, hidden_states.device)
        if visible is not None:
            hidden = hidden_bias(visible, math_dtype(q.dtype))
            bias = hidden if bias is None else bias.to(hidden.dtype) + hidden
        out = attend(q, k, v, bias, self.softmax_scale)
        return project(self.out_proj, out.flatten(-2), self.backend)

    def _visibility(self, seqlen: int, past: int, mask: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
        """Boolean (batch or 1, 1, seqlen, past + seqlen), True where a query may see a key; None: it sees all."""
        visible = None
        total = past + seqlen
        if self.causal and seqlen > 1:
            query_pos = torch.arange(past, total, device=device)[:, None]
            visible = (torch.arange(total, device=device)[None, :] <= query_pos)[None, None]
        if mask is not None:
            keys = mask.to(device=device, dtype=torch.bool)[:, None, None, :]
            visible = keys if visible is None else visible & keys
        return visible
