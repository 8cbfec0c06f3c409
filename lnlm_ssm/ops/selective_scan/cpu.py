"""Mamba-1 selective scan on the CPU: the C++ kernels of ``csrc/cpu/selective_scan.cpp`` in autograd.

The forward saves the state entering every ``CHECKPOINT_EVERY`` steps, (batch,
dim, seqlen / CHECKPOINT_EVERY, dstate) in the math dtype, instead of every
state; the backward recomputes each chunk's states from its checkpoint. With
dstate 16 that is a quarter of the size of u in fp32.
"""

from __future__ import annotations

import torch

from lnlm_ssm.ops import _library
from lnlm_ssm.utils.dtypes import math_dtype

_ops = _library.load()

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


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        acc = math_dtype(u.dtype)
        args = (
            u.contiguous(),
            delta.contiguous(),
            _pad_dstate(A.to(acc)).contiguous(),
            _time_major(B, acc),
            _time_major(C, acc),
            _opt(D, acc),
            _opt(z),
            _opt(delta_bias, acc),
        )
        checkpoint_every = CHECKPOINT_EVERY if any(ctx.needs_input_grad) else 0
        out, last_state, checkpoints = _ops.selective_scan_fwd(
            *args, _opt_state(initial_state, acc), delta_softplus, checkpoint_every
        )
        dstate = A.shape[-1]
        if checkpoint_every:
            ctx.save_for_backward(*args, checkpoints)
            ctx.delta_softplus = delta_softplus
            ctx.dtypes = (A.dtype, B.dtype, None if D is None else D.dtype, None if delta_bias is None else delta_bias.dtype)
            ctx.B_shape = B.shape
            ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
            ctx.dstate = dstate
        return out, last_state[..., :dstate]

    @staticmethod
    def backward(ctx, grad_out, grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
        A_dtype, B_dtype, D_dtype, bias_dtype = ctx.dtypes
        du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = _ops.selective_scan_bwd(
            grad_out.to(u.dtype).contiguous(),
            _opt_state(grad_last_state, A.dtype),
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            checkpoints,
            ctx.delta_softplus,
            CHECKPOINT_EVERY,
        )

        dstate = ctx.dstate

        def bc_grad(g):
            return g[..., :dstate].transpose(-1, -2).reshape(ctx.B_shape).to(B_dtype)

        return (
            du,
            ddelta,
            dA[:, :dstate].to(A_dtype),
            bc_grad(dB),
            bc_grad(dC),
            None if D_dtype is None else dD.to(D_dtype),
            None if z is None else dz,
            None if bias_dtype is None else dbias.to(bias_dtype),
            None if ctx.initial_state_dtype is None else dinit[..., :dstate].to(ctx.initial_state_dtype),
            None,
        )


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
    out, last_state = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus))
    return (out, last_state) if return_last_state else out
