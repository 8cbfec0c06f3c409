"""What the two SSM mixers (``Mamba``, ``Mamba2``) share: dt init, masks, the conv with its cached state,
and the forward that picks the decode step or the (chunked) scan.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from lnlm_ssm.layers.base import Mixer
from lnlm_ssm.layers.quantized import project
from lnlm_ssm.ops import causal_conv1d_fn


def inverse_softplus_dt(size: int, dt_min: float, dt_max: float, dt_init_floor: float, **factory) -> torch.Tensor:
    """softplus^-1 of dt ~ log-uniform in [dt_min, dt_max] (floored), so that softplus(bias) starts there."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max; got {dt_min!r}, {dt_max!r}")
    if not dt_init_floor > 0:
        raise ValueError(f"dt_init_floor must be > 0; got {dt_init_floor!r}")
    u = torch.rand(size, dtype=torch.float32, device=factory.get("device"))
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    # softplus^-1(dt) = log(exp(dt) - 1) = dt + log(1 - exp(-dt)), the latter stable for small dt.
    return (dt + torch.log(-torch.expm1(-dt))).to(factory.get("dtype") or torch.get_default_dtype())


def check_hidden_states(hidden_states, d_model: int, cache) -> int:
    """Validate (batch, seqlen, d_model) against the layer and the cache; return ``past``."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor; got {type(hidden_states).__name__}")
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != d_model or hidden_states.shape[1] < 1:
        raise ValueError(
            f"hidden_states must have shape (batch, seqlen >= 1, d_model={d_model}); got {tuple(hidden_states.shape)}"
        )
    if cache is None:
        return 0
    if cache.batch_size != hidden_states.shape[0]:
        raise ValueError(
            f"cache holds batch {cache.batch_size} but hidden_states has batch {hidden_states.shape[0]}"
        )
    return cache.seqlen


def chunk_mask(mask, batch: int, past: int, seqlen: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The current chunk's columns of ``mask`` (batch, past + seqlen) as 0/1 in ``dtype``: (batch, seqlen)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor of shape (batch, past + seqlen); got {type(mask).__name__}")
    if mask.shape != (batch, past + seqlen):
        raise ValueError(
            f"mask must have shape (batch, past + seqlen) = ({batch}, {past} + {seqlen}); got {tuple(mask.shape)}"
        )
    return mask[:, past:].to(dtype)


def weight_bmm(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) times x (batch, in, seqlen), any strides: (batch, out, seqlen), contiguous along seqlen.

    That is the layout the conv and the scan read. ``weight @ x`` may instead fold
    into one mm giving (batch, seqlen, out) and return its transpose, which the ops
    then copy: a strided copy that took a quarter of a 130M prefill.
    """
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def conv_weight(conv1d: nn.Conv1d) -> torch.Tensor:
    """The depthwise nn.Conv1d weight (dim, 1, width) as the (dim, width) the conv ops take."""
    return conv1d.weight.squeeze(1)


def conv_with_cache(x, conv1d: nn.Conv1d, cache, backend: str) -> torch.Tensor:
    """silu(causal conv) of x (batch, dim, seqlen) continued from ``cache.conv_state``, which then takes x in.

    conv_state (batch, dim, d_conv) holds the last d_conv inputs, newest last (the
    layout ``causal_conv1d_update`` keeps); ``causal_conv1d_fn`` reads only the
    newest d_conv - 1 of them as its initial states. The state is refreshed here
    rather than from the op's final states, which lack the oldest column.
    """
    conv_state = cache.conv_state
    out = causal_conv1d_fn(
        x,
        conv_weight(conv1d),
        conv1d.bias,
        initial_states=conv_state[..., 1:].to(x.dtype),
        activation="silu",
        backend=backend,
    )
    width, seqlen = conv_state.shape[-1], x.shape[-1]
    if seqlen >= width:
        cache.write("conv_state", x[..., seqlen - width :])
    else:
        cache.write("conv_state", torch.cat([conv_state[..., seqlen:], x.to(conv_state.dtype)], dim=-1))
    return out


class SSMMixer(Mixer):
    """The forward both SSM mixers share: validate, then the decode step or the (chunked) scan.

    Subclasses set ``d_model`` and implement ``_step(hidden_states, cache, keep)``
    (seqlen 1 with a cache) and ``_scan(hidden_states, cache, keep)`` (everything
    else); ``keep`` is the current chunk's 0/1 padding mask or None.
    """

    d_model: int
    backend: str

    def _project(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``linear(x)`` (float or quantised), through the kernels for the few rows of a decode step."""
        return project(linear, x, self.backend)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        *,
        mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(batch, seqlen, d_model) -> (batch, seqlen, d_model); ``position_ids`` is unused (no positions in an SSM)."""
        past = check_hidden_states(hidden_states, self.d_model, cache)
        batch, seqlen, _ = hidden_states.shape
        keep = chunk_mask(mask, batch, past, seqlen, hidden_states.dtype)
        # The decode step updates the state in place: a cache that tracks gradients takes the scan.
        if cache is not None and seqlen == 1 and not cache.track_grad:
            out = self._step(hidden_states, cache, keep)
        else:
            out = self._scan(hidden_states, cache, keep)
        if cache is not None:
            cache.seqlen += seqlen
        return out
