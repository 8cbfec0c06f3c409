"""The Mamba-2 mixer (Dao & Gu, 2024), with mamba_ssm's constructor and parameter names.

Paths as in ``mamba.py``: the full sequence (``mamba_chunk_scan_combined``), one
decode step (``selective_state_update`` in the (batch, nheads, headdim, dstate)
layout), and chunked prefill from the cached state.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lnlm_ssm.layers.cache import Mamba2Cache
from lnlm_ssm.layers.quantized import compute_dtype
from lnlm_ssm.layers.ssm import SSMMixer, conv_weight, conv_with_cache, inverse_softplus_dt
from lnlm_ssm.ops import (
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    rmsnorm_fn,
    selective_state_update,
)
from lnlm_ssm.ops._backends import backend_for, check_backend
from lnlm_ssm.utils.checks import NO_DT_LIMIT, check_dt_limit, check_positive_int
from lnlm_ssm.utils.dtypes import math_dtype, to_math_dtype


class _GatedRMSNorm(nn.Module):
    """RMSNorm of y gated by silu(z), normalised per group of ``group_size`` channels (mamba_ssm's RMSNormGated)."""

    def __init__(self, hidden: int, eps: float, group_size: int, norm_before_gate: bool, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, **factory))
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def forward(self, y: torch.Tensor, z: torch.Tensor, *, backend: str) -> torch.Tensor:
        return rmsnorm_fn(y, self.weight, None, z, self.eps, self.group_size, self.norm_before_gate, backend=backend)


class Mamba2(SSMMixer):
    """Mamba-2 mixer: (batch, seqlen, d_model) -> (batch, seqlen, d_model).

    Arguments and parameter names as mamba_ssm's ``Mamba2``, plus ``norm_eps``
    (the gated norm's eps; HF configs set it from ``layer_norm_epsilon``).
    ``d_inner = expand * d_model`` splits into ``nheads = d_inner // headdim``
    heads; B and C are shared by the ``nheads // ngroups`` heads of a group.
    ``backend`` is passed to every op that has a kernel for it, and "auto" to
    the others (``lnlm_ssm.ops._backends.backend_for``).
    """

    no_weight_decay = ("A_log", "D", "dt_bias")

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: Optional[float] = None,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = NO_DT_LIMIT,
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        backend: str = "auto",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("d_state", d_state),
            ("d_conv", d_conv),
            ("expand", expand),
            ("headdim", headdim),
            ("ngroups", ngroups),
            ("chunk_size", chunk_size),
        ):
            check_positive_int(name, value)
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"headdim must divide d_inner = expand * d_model = {d_inner}; got headdim={headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"ngroups must divide nheads = d_inner // headdim = {nheads}; got ngroups={ngroups}")
        low, high = A_init_range
        if not 0 < low <= high:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high; got {A_init_range!r}")
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0; got {norm_eps!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = d_inner
        self.headdim = headdim
        self.nheads = nheads
        self.ngroups = ngroups
        self.conv_dim = d_inner + 2 * ngroups * d_state
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.dt_limit = check_dt_limit(dt_limit)
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.backend = check_backend(backend)

        # Rows [z, x, B, C, dt]; x, B and C (the conv's channels) are contiguous.
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=d_conv,
            groups=self.conv_dim,
            padding=d_conv - 1,
            bias=conv_bias,
            **factory,
        )
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        self.dt_bias = nn.Parameter(inverse_softplus_dt(nheads, dt_min, dt_max, dt_init_floor, **factory))
        A = torch.empty(nheads, dtype=torch.float32, device=device).uniform_(low, high)
        self.A_log = nn.Parameter(torch.log(A).to(dtype or torch.get_default_dtype()))
        self.D = nn.Parameter(torch.ones(d_inner if D_has_hdim else nheads, **factory))
        if rmsnorm:
            self.norm = _GatedRMSNorm(d_inner, norm_eps, d_inner // ngroups, norm_before_gate, **factory)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **factory)

    def allocate_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None) -> Mamba2Cache:
        """Zero states for ``batch_size`` rows; ``max_seqlen`` is unused (the state does not grow)."""
        check_positive_int("batch_size", batch_size)
        device = self.out_proj.weight.device if device is None else device
        dtype = compute_dtype(self.out_proj) if dtype is None else dtype
        return Mamba2Cache(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=dtype),
            ssm_state=torch.zeros(
                batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=math_dtype(dtype)
            ),
        )

    def _split_xbc(self, xBC: torch.Tensor):
        """x (..., nheads, headdim), B and C (..., ngroups, d_state) from the conv's output (..., conv_dim)."""
        group_dim = self.ngroups * self.d_state
        x, B, C = xBC.split([self.d_inner, group_dim, group_dim], dim=-1)
        return (
            x.unflatten(-1, (self.nheads, self.headdim)),
            B.unflatten(-1, (self.ngroups, self.d_state)),
            C.unflatten(-1, (self.ngroups, self.d_state)),
        )

    def _D(self) -> torch.Tensor:
        D = to_math_dtype(self.D)
        return D.view(self.nheads, self.headdim) if self.D_has_hdim else D

    def _gate_and_project(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z (..., d_inner): the gated norm (or nothing: the scan gated already) and out_proj."""
        if self.rmsnorm:
            y = self.norm(y, z, backend=backend_for("rmsnorm_fn", self.backend))
        return self._project(self.out_proj, y)

    def _scan(self, hidden_states, cache: Optional[Mamba2Cache], keep: Optional[torch.Tensor]) -> torch.Tensor:
        batch, seqlen, _ = hidden_states.shape
        z, xBC, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = xBC.transpose(1, 2)  # (batch, conv_dim, seqlen), the conv's layout
        if keep is not None:
            xBC = xBC * keep[:, None, :]
        if cache is None:
            xBC = causal_conv1d_fn(
                xBC, conv_weight(self.conv1d), self.conv1d.bias, activation="silu", backend=self.backend
            )
        else:
            xBC = conv_with_cache(xBC, self.conv1d, cache, self.backend)
        x, B, C = self._split_xbc(xBC.transpose(1, 2))
        if keep is not None:
            x = x * keep[:, :, None, None]
        z_heads = z.unflatten(-1, (self.nheads, self.headdim))
        result = mamba_chunk_scan_combined(
            x,
            dt,
            -torch.exp(to_math_dtype(self.A_log)),
            B,
            C,
            self.chunk_size,
            D=self._D(),
            z=None if self.rmsnorm else z_heads,
            dt_bias=to_math_dtype(self.dt_bias),
            initial_states=None if cache is None else cache.ssm_state,
            dt_softplus=True,
            dt_limit=self.dt_limit,
            return_final_states=cache is not None,
            backend=self.backend,
        )
        if cache is None:
            y = result
        else:
            y, final_states = result
            cache.write("ssm_state", final_states)
        return self._gate_and_project(y.reshape(batch, seqlen, self.d_inner), z)

    def _step(self, hidden_states, cache: Mamba2Cache, keep: Optional[torch.Tensor]) -> torch.Tensor:
        batch = hidden_states.shape[0]
        z, xBC, dt = self._project(self.in_proj, hidden_states[:, 0]).split(
            [self.d_inner, self.conv_dim, self.nheads], dim=-1
        )
        if keep is not None:
            xBC = xBC * keep
        xBC = causal_conv1d_update(
            xBC, cache.conv_state, conv_weight(self.conv1d), self.conv1d.bias, activation="silu", backend=self.backend
        )
        x, B, C = self._split_xbc(xBC)
        if keep is not None:
            x = x * keep[:, :, None]
        dt_bias = to_math_dtype(self.dt_bias)
        dt_softplus = True
        if self.dt_limit != NO_DT_LIMIT:
            # The decode step has no dt_limit (nor has mamba_ssm's, whose decode then
            # drifts from its forward): apply it here exactly as the chunked scan does.
            dt = F.softplus(dt.to(dt_bias.dtype) + dt_bias).clamp(*self.dt_limit)
            dt_bias, dt_softplus = None, False
        y = selective_state_update(
            cache.ssm_state,
            x,
            dt,
            -torch.exp(to_math_dtype(self.A_log)),
            B,
            C,
            self._D(),
            None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim)),
            dt_bias=dt_bias,
            dt_softplus=dt_softplus,
            backend=self.backend,
        )
        return self._gate_and_project(y.reshape(batch, self.d_inner), z).unsqueeze(1)
