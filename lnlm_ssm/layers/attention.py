"""Multi-head self-attention (MHA / GQA / MQA), causal or not, with RoPE, a sliding window and a KV cache.

Parameters as mamba_ssm's ``MHA`` so that its hybrid checkpoints load unchanged:
``in_proj`` maps d_model to the rows ``[q, k, v]`` (each head-major,
``(heads, head_dim)``) and ``out_proj`` maps the heads back to d_model.
Query head ``h`` reads key/value head ``h // (num_heads // num_heads_kv)``, the
grouping of flash-attention and HF.

Which key a query may see: query at absolute position ``t`` (``past + i``)
sees key ``s`` when ``s <= t`` (causal), ``s > t - sliding_window`` (window) and
``mask[:, s]`` is true (padding). A padded query would then see nothing at all;
it is allowed to see itself so that softmax stays finite (its output is never
used, but a NaN there would poison the gradients).

With ``causal=False`` (an encoder's attention: BERT's, with ``qkv_proj_bias`` and
``out_proj_bias``) every query sees every real key, so the mask may mark padding
anywhere; encoders pad on the right. A padded key gets no attention score, so
a padded row's real positions come out as that row alone would.

Attention runs through torch's ``scaled_dot_product_attention``, or through
flash-attn's ``flash_attn_func`` (>= 2.3, for its ``window_size``) when that is
installed, ``use_flash_attn`` is on, and the call is one it serves exactly: CUDA
fp16/bf16 tensors and no padding mask. It takes grouped kv heads as they are and
aligns the causal diagonal bottom-right, which is the alignment a query chunk
after a cached past needs.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.layers.base import Mixer
from lnlm_ssm.layers.cache import AttentionCache
from lnlm_ssm.layers.quantized import compute_dtype, project
from lnlm_ssm.ops._backends import check_backend
from lnlm_ssm.utils.checks import check_positive_int
from lnlm_ssm.utils.dtypes import math_dtype


@functools.lru_cache(maxsize=None)
def flash_attn_func() -> Optional[Callable]:
    """flash-attn's ``flash_attn_func`` when flash-attn >= 2.3 is installed, else None."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func as func
    except ImportError:
        return None
    major, minor = (int(part) for part in flash_attn.__version__.split(".")[:2])
    return func if (major, minor) >= (2, 3) else None


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, base: float, dtype: torch.dtype):
    """cos and sin ``(*position_ids.shape, rotary_dim // 2)`` of angle position * base^(-2j / rotary_dim)."""
    compute = math_dtype(dtype)
    exponents = torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=compute) / rotary_dim
    angles = position_ids.to(compute)[..., None] * base ** (-exponents)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` channels of x ``(batch, seqlen, heads, head_dim)``.

    cos, sin: ``(batch, seqlen, rotary_dim // 2)``. Channel pairs are ``(j, j + rotary_dim/2)``
    (GPT-NeoX / HF-Llama "rotate half") or, with ``interleaved``, ``(2j, 2j + 1)`` (GPT-J).
    The remaining channels pass through.
    """
    rotary_dim = 2 * cos.shape[-1]
    rot, rest = x[..., :rotary_dim].to(cos.dtype), x[..., rotary_dim:]
    cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


class Attention(Mixer):
    """Self-attention mixer keeping the contract of :mod:`lnlm_ssm.layers`.

    Args (mamba_ssm's ``MHA`` names; ``d_model`` is its ``embed_dim``):
        num_heads_kv: key/value heads (GQA; 1 is MQA). Default ``num_heads``.
        head_dim: default ``d_model // num_heads``.
        softmax_scale: default ``head_dim ** -0.5``.
        rotary_emb_dim: RoPE on the first this-many channels of each q/k head (0: none).
        sliding_window: each query sees at most this many most recent keys, itself included.
        d_conv: mamba_ssm's optional short conv on qkv; only 0 (none) is supported.
        use_flash_attn: use flash-attn where it serves the call exactly (see the module docstring).
        backend: for the projections (``decode_linear``, or ``weight_only_linear`` once quantised);
            ``scaled_dot_product_attention`` picks its kernel itself.

    The cache path is for inference: it writes k and v into the cache in place (out of place, with their
    graph, when the cache tracks gradients: ``layers.cache``).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_heads_kv: Optional[int] = None,
        head_dim: Optional[int] = None,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        softmax_scale: Optional[float] = None,
        causal: bool = True,
        rotary_emb_dim: int = 0,
        rotary_emb_base: float = 10000.0,
        rotary_emb_interleaved: bool = False,
        sliding_window: Optional[int] = None,
        d_conv: int = 0,
        use_flash_attn: bool = True,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("num_heads", num_heads)
        num_heads_kv = num_heads if num_heads_kv is None else check_positive_int("num_heads_kv", num_heads_kv)
        if num_heads % num_heads_kv != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_heads_kv ({num_heads_kv}): "
                "each key/value head serves a whole group of query heads"
            )
        if head_dim is None:
            if d_model % num_heads != 0:
                raise ValueError(
                    f"d_model ({d_model}) must be divisible by num_heads ({num_heads}) when head_dim is not given"
                )
            head_dim = d_model // num_heads
        check_positive_int("head_dim", head_dim)
        if not isinstance(rotary_emb_dim, int) or rotary_emb_dim < 0 or rotary_emb_dim % 2 or rotary_emb_dim > head_dim:
            raise ValueError(f"rotary_emb_dim must be an even integer in [0, head_dim={head_dim}], got {rotary_emb_dim!r}")
        if not rotary_emb_base > 0:
            raise ValueError(f"rotary_emb_base must be positive, got {rotary_emb_base!r}")
        if sliding_window is not None:
            check_positive_int("sliding_window", sliding_window)
            if not causal:
                raise ValueError("sliding_window counts the most recent keys, so it needs causal=True")
        if d_conv != 0:
            raise ValueError(f"d_conv must be 0: the short convolution on qkv is not supported, got d_conv={d_conv!r}")
        if softmax_scale is not None and not softmax_scale > 0:
            raise ValueError(f"softmax_scale must be positive or None, got {softmax_scale!r}")

        self.d_model = d_model
        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv
        self.head_dim = head_dim
        self.softmax_scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
        self.causal = causal
        self.rotary_emb_dim = rotary_emb_dim
        self.rotary_emb_base = rotary_emb_base
        self.rotary_emb_interleaved = rotary_emb_interleaved
        self.sliding_window = sliding_window
        self.d_conv = d_conv
        self.use_flash_attn = use_flash_attn
        self.layer_idx = layer_idx
        self.backend = check_backend(backend)

        factory = {"device": device, "dtype": dtype}
        qkv_dim = (num_heads + 2 * num_heads_kv) * head_dim
        self.in_proj = nn.Linear(d_model, qkv_dim, bias=qkv_proj_bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, d_model, bias=out_proj_bias, **factory)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_heads_kv={self.num_heads_kv}, head_dim={self.head_dim}, "
            f"causal={self.causal}, rotary_emb_dim={self.rotary_emb_dim}, sliding_window={self.sliding_window}"
        )

    def allocate_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None) -> AttentionCache:
        """Zeroed K and V ``(batch_size, max_seqlen, num_heads_kv, head_dim)``, by default like ``out_proj``."""
        check_positive_int("batch_size", batch_size)
        check_positive_int("max_seqlen", max_seqlen)
        device = self.out_proj.weight.device if device is None else device
        dtype = compute_dtype(self.out_proj) if dtype is None else dtype
        shape = (batch_size, max_seqlen, self.num_heads_kv, self.head_dim)
        return AttentionCache(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            seqlen=0,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Optional[AttentionCache] = None,
        *,
        mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(
                f"hidden_states must have shape (batch, seqlen, d_model={self.d_model}), "
                f"got {tuple(hidden_states.shape)}"
            )
        batch, seqlen, _ = hidden_states.shape
        if cache is not None:
            self._check_cache(cache, batch, seqlen)
        past = 0 if cache is None else cache.seqlen
        total = past + seqlen
        device = hidden_states.device
        if mask is not None:
            mask = self._check_mask(mask, batch, total, device)
        if position_ids is not None:
            self._check_position_ids(position_ids, batch, seqlen, device)

        q, k, v = project(self.in_proj, hidden_states, self.backend).split(
            [self.num_heads * self.head_dim, self.num_heads_kv * self.head_dim, self.num_heads_kv * self.head_dim],
            dim=-1,
        )
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_heads_kv, self.head_dim))
        v = v.unflatten(-1, (self.num_heads_kv, self.head_dim))
        if self.rotary_emb_dim:
            if position_ids is None:
                position_ids = torch.arange(past, total, device=device).expand(batch, seqlen)
            cos, sin = rotary_cos_sin(position_ids, self.rotary_emb_dim, self.rotary_emb_base, q.dtype)
            q = apply_rotary(q, cos, sin, self.rotary_emb_interleaved)
            k = apply_rotary(k, cos, sin, self.rotary_emb_interleaved)

        if cache is not None:
            cache.write("k", k, start=past)
            cache.write("v", v, start=past)
            cache.seqlen = total
            k = cache.k[:, :total].to(q.dtype)
            v = cache.v[:, :total].to(q.dtype)

        out = self._attend(q, k, v, past, mask)
        return project(self.out_proj, out.flatten(-2), self.backend)

    def _attend(self, q, k, v, past: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """softmax(q k^T * scale + masks) v over ``(batch, seqlen|total, heads, head_dim)`` inputs."""
        seqlen = q.shape[1]
        flash = self.use_flash_attn and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if flash and flash_attn_func() is not None:
            window = (-1, -1) if self.sliding_window is None else (self.sliding_window - 1, 0)
            return flash_attn_func()(q, k, v, softmax_scale=self.softmax_scale, causal=self.causal, window_size=window)
        groups = self.num_heads // self.num_heads_kv
        if groups > 1:
            # Repeating the kv heads works on every torch >= 2.4 and with any mask;
            # SDPA's enable_gqa would save the copy only on its fused kernels.
            k = k.repeat_interleave(groups, dim=2)
            v = v.repeat_interleave(groups, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))

        # SDPA's is_causal aligns the diagonal top-left, which is right only without a past;
        # a single query after a past sees every key, so it needs no mask at all.
        needs_mask = mask is not None or self.sliding_window is not None or (self.causal and past > 0 and seqlen > 1)
        attn_mask = self._visibility(seqlen, past, mask, q.device) if needs_mask else None
        is_causal = self.causal and not needs_mask and seqlen > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.softmax_scale)
        return out.transpose(1, 2)

    def _visibility(self, seqlen: int, past: int, mask: Optional[torch.Tensor], device) -> torch.Tensor:
        """Boolean ``(batch or 1, 1, seqlen, past + seqlen)``: True where a query may see a key."""
        total = past + seqlen
        query_pos = torch.arange(past, total, device=device)[:, None]
        key_pos = torch.arange(total, device=device)[None, :]
        visible = None
        if self.causal:
            visible = key_pos <= query_pos
        if self.sliding_window is not None:
            visible = visible & (key_pos > query_pos - self.sliding_window)
        if mask is not None:
            by_padding = mask[:, None, :] | (key_pos == query_pos)
            visible = by_padding if visible is None else visible & by_padding
            return visible[:, None]
        return visible[None, None]

    def _check_cache(self, cache, batch: int, seqlen: int) -> None:
        if not isinstance(cache, AttentionCache):
            raise TypeError(f"cache must be the AttentionCache from allocate_cache, got {type(cache).__name__}")
        expected = (batch, self.num_heads_kv, self.head_dim)
        got = (cache.k.shape[0], cache.k.shape[2], cache.k.shape[3])
        if cache.k.ndim != 4 or got != expected or cache.v.shape != cache.k.shape:
            raise ValueError(
                f"cache.k and cache.v must have shape (batch={batch}, max_seqlen, num_heads_kv={self.num_heads_kv}, "
                f"head_dim={self.head_dim}), got {tuple(cache.k.shape)} and {tuple(cache.v.shape)}"
            )
        max_seqlen = cache.k.shape[1]
        if cache.seqlen + seqlen > max_seqlen:
            raise ValueError(
                f"cache overflow: the cache holds {cache.seqlen} of max_seqlen={max_seqlen} positions and "
                f"cannot take {seqlen} more; allocate_cache with a larger max_seqlen"
            )

    @staticmethod
    def _check_mask(mask, batch: int, total: int, device) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"mask must be a bool or integer tensor (True/1 = real token), got {mask.dtype}")
        if mask.shape != (batch, total):
            raise ValueError(
                f"mask must have shape (batch={batch}, past + seqlen={total}), got {tuple(mask.shape)}"
            )
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but hidden_states is on {device}")
        return mask.bool()

    @staticmethod
    def _check_position_ids(position_ids, batch: int, seqlen: int, device) -> None:
        if not isinstance(position_ids, torch.Tensor):
            raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
        if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
            raise TypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        if position_ids.shape != (batch, seqlen):
            raise ValueError(
                f"position_ids must have shape (batch={batch}, seqlen={seqlen}), got {tuple(position_ids.shape)}"
            )
        if position_ids.device != device:
            raise ValueError(f"position_ids is on {position_ids.device} but hidden_states is on {device}")
