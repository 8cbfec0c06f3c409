"""Mamba-1 selective scan on the CPU: the C++ kernels of ``csrc/cpu/selective_scan.cpp``.

The kernels read u, delta and z contiguous, everything else in the math dtype,
B and C time-major ``(batch, ngroups, seqlen, dstate)`` and dstate padded to a
multiple of ``LANES``; this module brings the inputs to that layout, and the
autograd Function it shares with the cuda backend (``extension.py``) does the rest.
The forward saves the state entering every ``CHECKPOINT_EVERY`` steps, (batch,
dim, seqlen / CHECKPOINT_EVERY, dstate) in the math dtype, instead of every
state. With dstate 16 that is a quarter of the size of u in fp32.
"""

from __future__ import annotations

import torch

from lnlm_ssm.ops.selective_scan.extension import SelectiveScan
from lnlm_ssm.utils.dtypes import math_dtype

CHECKPOINT_EVERY = 64  # a multiple of the kernel's time block (kBlock = 64 in the C++)
LANES = 8  # the kernel's vector width along dstate (kLanes in the C++)


def _pad_dstate(t: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last dimension (dstate) to a multiple of LANES: zero A, B and C keep padded states at 0."""
    extra = -t.shape[-1] % LANES
    return torch.nn.functional.pad(t, (0, extra)) if extra else t


def _time_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen) -> contiguous (batch, ngroups, seqlen, dstate)."""
    t = t if t.ndim == 4 else t.unsqueeze(1)
    return _pad_dstate(t.to(dtype).transpose(-1, -2)).contiguous()


def _opt(t, dtype=None):
    if t is None:
        return None
    return (t if dtype is None else t.to(dtype)).contiguous()


def _opt_state(t, dtype):
    return None if t is None else _pad_dstate(t.to(dtype)).contiguous()


def selective_scan_cpu(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    initial_state=None,
):
    acc = math_dtype(u.dtype)
    out, last_state = SelectiveScan.apply(
        u.contiguous(),
        delta.contiguous(),
        _pad_dstate(A.to(acc)).contiguous(),
        _time_major(B, acc),
        _time_major(C, acc),
        _opt(D, acc),
        _opt(z),
        _opt(delta_bias, acc),
        _opt_state(initial_state, acc),
        bool(delta_softplus),
        CHECKPOINT_EVERY,
    )
    return (out, last_state[..., : A.shape[-1]]) if return_last_state else out
