"""Cross-attention: a decoder's positions attend to a memory (the encoder's output), whose keys and values are
projected once (``memory``) and read at every decoder step.

``softmax(q k^T * softmax_scale + hidden) v`` with q from the decoder and k, v
from the memory; ``hidden`` hides padded memory positions (see
``layers.biased_attention``). No position bias and no causal mask: every decoder
position sees the whole memory. T5's ``softmax_scale`` is 1 and it has no biases.

Parameters: ``q_proj`` d_model -> heads, ``kv_proj`` memory -> rows ``[k, v]``, ``out_proj``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lnlm_ssm.layers.biased_attention import attend, check_hidden_states, head_size, hidden_bias
from lnlm_ssm.layers.cache import CrossAttentionCache
from lnlm_ssm.layers.quantized import project
from lnlm_ssm.ops._backends import check_backend
from lnlm_ssm.utils.dtypes import math_dtype


class CrossAttention(nn.Module):
    """Attention from (batch, seqlen, d_model) queries to a memory (batch, memory_len, d_model).

    Args as ``BiasedAttention``'s: head_dim defaults to ``d_model // num_heads``,
    softmax_scale to ``head_dim ** -0.5`` (T5: 1), ``bias`` on the projections.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: Optional[int] = None,
        softmax_scale: Optional[float] = None,
        bias: bool = False,
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
        self.backend = check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=bias, **factory)
        self.kv_proj = nn.Linear(d_model, 2 * inner, bias=bias, **factory)
        self.out_proj = nn.Linear(inner, d_model, bias=bias, **factory)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, softmax_scale={self.softmax_scale}"

    def memory(self, memory: torch.Tensor, mask: Optional[torch.Tensor] = None) -> CrossAttentionCache:
        """The keys and values of ``memory`` (batch, memory_len, d_model), with its ``mask`` (batch, memory_len;
        True/1 real, None: all real)."""
        if not isinstance(memory, torch.Tensor) or memory.ndim != 3 or memory.shape[-1] != self.d_model:
            got = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
            raise ValueError(f"memory must be a tensor of shape (batch, memory_len, d_model={self.d_model}), got {got}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != memory.shape[:2]:
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"mask must be a tensor of shape (batch, memory_len) = {tuple(memory.shape[:2])}, got {got}"
                )
            mask = mask.to(device=memory.device, dtype=torch.bool)
        k, v = project(self.kv_proj, memory, self.backend).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(2)
        return CrossAttentionCache(k=k, v=v, mask=mask)

    def forward(self, hidden_states: torch.Tensor, memory: CrossAttentionCache) -> torch.Tensor:
        """(batch, seqlen, d_model) -> (batch, seqlen, d_model), attending to ``memory`` (from ``self.memory``)."""
        if not isinstance(memory, CrossAttentionCache):
            raise TypeError(
                f"memory must be the CrossAttentionCache from CrossAttention.memory, got {type(memory).__name__}"
            )
        check_hidden_states(hidden_states, self.d_model)
        if hidden_states.shape[0] != memory.k.shape[0]:
            raise ValueError(
                f"hidden_states has batch {hidden_states.shape[0]} but the memory batch {memory.k.shape[0]}"
            )
        q = project(self.q_proj, hidden_states, self.backend).unflatten(-1, (self.num_heads, self.head_dim))
        bias = None
        if memory.mask is not None:
            bias = hidden_bias(memory.mask[:, None, None, :], math_dtype(q.dtype))
        out = attend(q, memory.k.to(q.dtype), memory.v.to(q.dtype), bias, self.softmax_scale)
        return project(self.out_proj, out.flatten(-2), self.backend)
