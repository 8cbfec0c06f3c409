"""Mamba-1 selective scan on the CPU: the C++ kernels of ``csrc/cpu/selective_scan.cpp``.

The kernels read u, delta and z contiguous, everything else in the math dtype,
a time-varying B or C time-major ``(batch, ngroups, seqlen, dstate)``, a
time-invariant one ``(dim, dstate)``, and dstate padded to a multiple of
``LANES``; complex tensors (complex A, the states, a time-invariant B or C) as
real planes ``(..., 2, dstate)``, real part then imaginary part. This module
brings the inputs to that layout with differentiable torch ops, and the autograd
Function it shares with the cuda backend (``extension.py``) does the rest. The
forward saves the state entering every ``CHECKPOINT_EVERY`` steps, (batch, dim,
seqlen / CHECKPOINT_EVERY, dstate) in the math dtype, instead of every state.
With dstate 16 that is a quarter of the size of u in fp32.
"""

from __future__ import annotations

import torch
from einops import rearrange

from lnlm_ssm.ops.selective_scan.extension import SelectiveScan
from lnlm_ssm.utils.dtypes import math_dtype

CHECKPOINT_EVERY = 64  # a multiple of the kernel's time block (kBlock = 64 in the C++)
LANES = 8  # the kernel's vector width along dstate (kLanes in the C++)


def _pad_dstate(t: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last dimension (dstate) to a multiple of LANES: zero A, B and C keep padded states at 0."""
    extra = -t.shape[-1] % LANES
    return torch.nn.functional.pad(t, (0, extra)) if extra else t


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _planes(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Complex (..., dstate) -> real (..., 2, dstate) in ``acc``: the real parts, then the imaginary ones."""
    t = t.to(_complex_of(acc))
    return torch.stack((t.real, t.imag), dim=-2)


def _parameter(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """A, a time-invariant B or C, or a state, in the kernel's layout (planes when complex)."""
    return _pad_dstate(_planes(t, acc) if t.is_complex() else t.to(acc)).contiguous()


def _projection(t: torch.Tensor, acc: torch.dtype, complex_A: bool) -> torch.Tensor:
    """B or C in the kernel's layout: time-varying ones become (batch, ngroups, seqlen, [2,] dstate)."""
    if t.ndim == 2:
        return _parameter(t, acc)
    t = (t if t.ndim == 4 else t.unsqueeze(1)).to(acc)
    # With complex A, the last axis holds (real, imaginary) pairs of every step.
    t = rearrange(t, "b g n (l two) -> b g l two n", two=2) if complex_A else t.transpose(-1, -2)
    return _pad_dstate(t).contiguous()


def _opt(t, dtype=None):
    if t is None:
        return None
    return (t if dtype is None else t.to(dtype)).contiguous()


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
    complex_A = A.is_complex()
    out, last_state = SelectiveScan.apply(
        u.contiguous(),
        delta.contiguous(),
        _parameter(A, acc),
        _projection(B, acc, complex_A),
        _projection(C, acc, complex_A),
        _opt(D, acc),
        _opt(z),
        _opt(delta_bias, acc),
        None if initial_state is None else _parameter(initial_state, acc),
        bool(delta_softplus),
        CHECKPOINT_EVERY,
    )
    if not return_last_state:
        return out
    last_state = last_state[..., : A.shape[-1]]
    return out, (torch.complex(last_state[:, :, 0], last_state[:, :, 1]) if complex_A else last_state)
