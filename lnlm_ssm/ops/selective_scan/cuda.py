"""Mamba-1 selective scan on the GPU: the CUDA kernels of ``csrc/cuda/selective_scan/`` in autograd.

Same signature as ``selective_scan_ref``. u, delta and z keep their dtype
(float32, float16 or bfloat16) and strides; A, B, C, D, delta_bias and the states
go to the kernel in float32, B and C as ``(batch, ngroups, dstate, seqlen)``.
The forward saves the state entering every ``CHECKPOINT_EVERY`` steps, (batch,
dim, ceil(seqlen / CHECKPOINT_EVERY), dstate) in float32; the backward recomputes
each chunk from its checkpoint.

The ops' schemas and fake implementations come from the CPU side:
``_library.load()`` imports ``lnlm_ssm._C``; ``lnlm_ssm._cuda`` only adds the
CUDA kernels to those schemas, so it is imported after.
"""

from __future__ import annotations

import importlib

import torch

from lnlm_ssm.ops import _library

_ops = _library.load()  # lnlm_ssm._C first: it defines the schemas
importlib.import_module("lnlm_ssm._cuda")  # registers the CUDA kernels

# A multiple of 64 up to 256 (kSelectiveScanCheckpointQuantum, ...MaxCheckpointEvery
# in selective_scan.h). With dstate 16 the checkpoints are 1/16 of u's elements.
CHECKPOINT_EVERY = 256


def _f32(t):
    return None if t is None else t.to(torch.float32)


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """(batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen) -> float32 (batch, ngroups, dstate, seqlen)."""
    return (t if t.ndim == 4 else t.unsqueeze(1)).to(torch.float32)


def _like(grad, t):
    """The gradient of t (None when t was None), in t's dtype."""
    return None if t is None else grad.to(t.dtype)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        args = (u, delta, _f32(A), _grouped(B), _grouped(C), _f32(D), z, _f32(delta_bias))
        checkpoint_every = CHECKPOINT_EVERY if any(ctx.needs_input_grad) else 0
        out, last_state, checkpoints = _ops.selective_scan_fwd(
            *args, _f32(initial_state), delta_softplus, checkpoint_every
        )
        if checkpoint_every:
            ctx.save_for_backward(*args, checkpoints)
            ctx.delta_softplus = delta_softplus
            ctx.originals = (A, B, D, delta_bias, initial_state)
        return out, last_state

    @staticmethod
    def backward(ctx, grad_out, grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
        A_in, B_in, D_in, bias_in, initial_in = ctx.originals
        du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = _ops.selective_scan_bwd(
            grad_out.to(u.dtype),
            _f32(grad_last_state),
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
        return (
            du,
            ddelta,
            dA.to(A_in.dtype),
            dB.reshape(B_in.shape).to(B_in.dtype),
            dC.reshape(B_in.shape).to(B_in.dtype),
            _like(dD, D_in),
            None if z is None else dz,
            _like(dbias, bias_in),
            _like(dinit, initial_in),
            None,
        )


def selective_scan_cuda(
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
