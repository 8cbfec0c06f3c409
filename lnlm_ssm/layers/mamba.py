"""The Mamba-1 mixer (Gu & Dao, 2023), with mamba_ssm's constructor and parameter names.

One forward, three paths (see the mixer contract in ``lnlm_ssm.layers``):

- no cache: the full sequence from a zero state (``selective_scan_fn``);
- cache and seqlen == 1: one decode step (``causal_conv1d_update`` + ``selective_state_update``);
- cache and seqlen > 1: chunked prefill, the full path started from the cached state.

The helpers below (state dtype, dt init, mask and conv-state handling) are shared with ``mamba2.py``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lnlm_ssm.layers.cache import MambaCache
from lnlm_ssm.ops import (
    causal_conv1d_fn,
    causal_conv1d_update,
    decode_linear,
    selective_scan_fn,
    selective_state_update,
)
from lnlm_ssm.ops._backends import BACKENDS
from lnlm_ssm.ops._checks import check_positive_int


def ssm_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """SSM states are kept in fp32, or float64 for a float64 layer (so its decode matches its full path)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """A, D and dt biases enter the scans in fp32 (as in mamba_ssm) but keep float64 for float64 layers."""
    return t.to(ssm_state_dtype(t.dtype))


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


def check_backend(backend) -> None:
    """Catch a misspelt backend when the layer is built rather than at its first forward."""
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}")


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


def conv_with_cache(x, conv1d: nn.Conv1d, conv_state: torch.Tensor, backend: str) -> torch.Tensor:
    """silu(causal conv) of x (batch, dim, seqlen) continued from ``conv_state``, which then takes x in.

    conv_state (batch, dim, d_conv) holds the last d_conv inputs, newest last (the
    layout ``causal_conv1d_update`` keeps); ``causal_conv1d_fn`` reads only the
    newest d_conv - 1 of them as its initial states. The state is refreshed here
    rather than from the op's final states, which lack the oldest column.
    """
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
        conv_state.copy_(x[..., seqlen - width :].detach())
    else:
        conv_state.copy_(torch.cat([conv_state[..., seqlen:], x.detach().to(conv_state.dtype)], dim=-1))
    return out


class SSMMixer(nn.Module):
    """The forward both SSM mixers share: validate, then the decode step or the (chunked) scan.

    Subclasses set ``d_model`` and implement ``_step(hidden_states, cache, keep)``
    (seqlen 1 with a cache) and ``_scan(hidden_states, cache, keep)`` (everything
    else); ``keep`` is the current chunk's 0/1 padding mask or None.
    """

    d_model: int
    backend: str

    def _project(self, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``linear(x)``, through ``decode_linear`` (faster for the few rows of a decode step)."""
        return decode_linear(x, linear.weight, linear.bias, backend=self.backend)

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
        if cache is not None and seqlen == 1:
            out = self._step(hidden_states, cache, keep)
        else:
            out = self._scan(hidden_states, cache, keep)
        if cache is not None:
            cache.seqlen += seqlen
        return out


class Mamba(SSMMixer):
    """Mamba-1 mixer: (batch, seqlen, d_model) -> (batch, seqlen, d_model).

    Arguments and parameter names as mamba_ssm's ``Mamba``; ``backend`` is passed
    to every op. ``d_inner = expand * d_model``; ``dt_rank="auto"`` is
    ``ceil(d_model / 16)``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        backend: str = "auto",
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            check_positive_int(name, value)
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        check_positive_int("dt_rank", dt_rank)
        check_backend(backend)
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant'; got {dt_init!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank
        self.layer_idx = layer_idx
        self.backend = backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            bias=conv_bias,
            **factory,
        )
        self.x_proj = nn.Linear(self.d_inner, dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(dt_rank, self.d_inner, bias=True, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

        dt_init_std = dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(dt_init_std)
            else:
                self.dt_proj.weight.uniform_(-dt_init_std, dt_init_std)
            self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor, **factory))
        # A model-level re-init must keep the dt bias (mamba_ssm's flag for it).
        self.dt_proj.bias._no_reinit = True

        # S4D-real: A[d, n] = -(n + 1), stored as a log so that A stays negative.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).expand(self.d_inner, d_state)
        self.A_log = nn.Parameter(torch.log(A).to(dtype or torch.get_default_dtype()).contiguous())
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, **factory))
        self.D._no_weight_decay = True

    def allocate_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None) -> MambaCache:
        """Zero states for ``batch_size`` rows; ``max_seqlen`` is unused (the state does not grow)."""
        check_positive_int("batch_size", batch_size)
        device = self.out_proj.weight.device if device is None else device
        dtype = self.out_proj.weight.dtype if dtype is None else dtype
        return MambaCache(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype),
            ssm_state=torch.zeros(
                batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_state_dtype(dtype)
            ),
        )

    def _scan(self, hidden_states, cache: Optional[MambaCache], keep: Optional[torch.Tensor]) -> torch.Tensor:
        xz = weight_bmm(self.in_proj.weight, hidden_states.transpose(1, 2))  # (batch, 2 * d_inner, seqlen)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        x, z = xz.chunk(2, dim=1)
        if keep is not None:
            x = x * keep[:, None, :]
        if cache is None:
            x = causal_conv1d_fn(x, conv_weight(self.conv1d), self.conv1d.bias, activation="silu", backend=self.backend)
        else:
            x = conv_with_cache(x, self.conv1d, cache.conv_state, self.backend)
        if keep is not None:
            x = x * keep[:, None, :]

        x_dbl = weight_bmm(self.x_proj.weight, x)  # (batch, dt_rank + 2 * d_state, seqlen)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = weight_bmm(self.dt_proj.weight, dt)  # the bias goes to the scan
        result = selective_scan_fn(
            x,
            delta,
            -torch.exp(fp32_or_wider(self.A_log)),
            B,
            C,
            fp32_or_wider(self.D),
            z,
            delta_bias=fp32_or_wider(self.dt_proj.bias),
            delta_softplus=True,
            return_last_state=cache is not None,
            initial_state=None if cache is None else cache.ssm_state,
            backend=self.backend,
        )
        if cache is None:
            y = result
        else:
            y, last_state = result
            cache.ssm_state.copy_(last_state.detach())
        return self.out_proj(y.transpose(1, 2))

    def _step(self, hidden_states, cache: MambaCache, keep: Optional[torch.Tensor]) -> torch.Tensor:
        x, z = self._project(self.in_proj, hidden_states[:, 0]).chunk(2, dim=-1)  # (batch, d_inner) each
        if keep is not None:
            x = x * keep
        x = causal_conv1d_update(
            x, cache.conv_state, conv_weight(self.conv1d), self.conv1d.bias, activation="silu", backend=self.backend
        )
        if keep is not None:
            x = x * keep
        dt, B, C = self._project(self.x_proj, x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = selective_state_update(
            cache.ssm_state,
            x,
            F.linear(dt, self.dt_proj.weight),
            -torch.exp(fp32_or_wider(self.A_log)),
            B,
            C,
            fp32_or_wider(self.D),
            z,
            dt_bias=fp32_or_wider(self.dt_proj.bias),
            dt_softplus=True,
            backend=self.backend,
        )
        return self._project(self.out_proj, y).unsqueeze(1)
