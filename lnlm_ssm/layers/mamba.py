"""The Mamba-1 mixer (Gu & Dao, 2023), with mamba_ssm's constructor and parameter names.

One forward, three paths (see the mixer contract in ``lnlm_ssm.layers``):

- no cache: the full sequence from a zero state (``selective_scan_fn``);
- cache and seqlen == 1: one decode step (``causal_conv1d_update`` + ``selective_state_update``);
- cache and seqlen > 1: chunked prefill, the full path started from the cached state.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from lnlm_ssm.layers.cache import MambaCache
from lnlm_ssm.layers.quantized import compute_dtype, dense_weight, project
from lnlm_ssm.layers.ssm import SSMMixer, conv_weight, conv_with_cache, inverse_softplus_dt, weight_bmm
from lnlm_ssm.ops import causal_conv1d_fn, causal_conv1d_update, selective_scan_fn, selective_state_update
from lnlm_ssm.ops._backends import check_backend
from lnlm_ssm.utils.checks import check_positive_int
from lnlm_ssm.utils.dtypes import math_dtype, to_math_dtype


class Mamba(SSMMixer):
    """Mamba-1 mixer: (batch, seqlen, d_model) -> (batch, seqlen, d_model).

    Arguments and parameter names as mamba_ssm's ``Mamba``; ``backend`` is passed
    to every op. ``d_inner = expand * d_model``; ``dt_rank="auto"`` is
    ``ceil(d_model / 16)``.
    """

    # Decay would pull every state's decay rate toward one value (A_log is a matrix).
    no_weight_decay = ("A_log", "D")
    # The dt bias is drawn so that softplus(bias) is log-uniform in [dt_min, dt_max]: a re-init must keep it.
    keep_init = ("dt_proj.bias",)

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
        self.backend = check_backend(backend)

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

        # S4D-real: A[d, n] = -(n + 1), stored as a log so that A stays negative.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).expand(self.d_inner, d_state)
        self.A_log = nn.Parameter(torch.log(A).to(dtype or torch.get_default_dtype()).contiguous())
        self.D = nn.Parameter(torch.ones(self.d_inner, **factory))

    def allocate_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None) -> MambaCache:
        """Zero states for ``batch_size`` rows; ``max_seqlen`` is unused (the state does not grow)."""
        check_positive_int("batch_size", batch_size)
        device = self.out_proj.weight.device if device is None else device
        dtype = compute_dtype(self.out_proj) if dtype is None else dtype
        return MambaCache(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype),
            ssm_state=torch.zeros(
                batch_size, self.d_inner, self.d_state, device=device, dtype=math_dtype(dtype)
            ),
        )

    def _x_dbl(self, x: torch.Tensor) -> torch.Tensor:
        """x_proj of the conv's output: (batch, d_inner, seqlen) -> (batch, dt_rank + 2 * d_state, seqlen), or in a
        decode step (batch, d_inner) -> (batch, dt_rank + 2 * d_state). Its own method: the one reduction over all
        channels in the layer, where tensor parallelism sums the ranks' parts."""
        if x.ndim == 2:
            return self._project(self.x_proj, x)
        return weight_bmm(dense_weight(self.x_proj), x)

    def _scan(self, hidden_states, cache: Optional[MambaCache], keep: Optional[torch.Tensor]) -> torch.Tensor:
        xz = weight_bmm(dense_weight(self.in_proj), hidden_states.transpose(1, 2))  # (batch, 2 * d_inner, seqlen)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        x, z = xz.chunk(2, dim=1)
        if keep is not None:
            x = x * keep[:, None, :]
        if cache is None:
            x = causal_conv1d_fn(x, conv_weight(self.conv1d), self.conv1d.bias, activation="silu", backend=self.backend)
        else:
            x = conv_with_cache(x, self.conv1d, cache, self.backend)
        if keep is not None:
            x = x * keep[:, None, :]

        x_dbl = self._x_dbl(x)  # (batch, dt_rank + 2 * d_state, seqlen)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = weight_bmm(dense_weight(self.dt_proj), dt)  # the bias goes to the scan
        result = selective_scan_fn(
            x,
            delta,
            -torch.exp(to_math_dtype(self.A_log)),
            B,
            C,
            to_math_dtype(self.D),
            z,
            delta_bias=to_math_dtype(self.dt_proj.bias),
            delta_softplus=True,
            return_last_state=cache is not None,
            initial_state=None if cache is None else cache.ssm_state,
            backend=self.backend,
        )
        if cache is None:
            y = result
        else:
            y, last_state = result
            cache.write("ssm_state", last_state)
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
        dt, B, C = self._x_dbl(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        y = selective_state_update(
            cache.ssm_state,
            x,
            project(self.dt_proj, dt, self.backend, bias=False),
            -torch.exp(to_math_dtype(self.A_log)),
            B,
            C,
            to_math_dtype(self.D),
            z,
            dt_bias=to_math_dtype(self.dt_proj.bias),
            dt_softplus=True,
            backend=self.backend,
        )
        return self._project(self.out_proj, y).unsqueeze(1)
