"""The selective scan of the C++ extensions in autograd: one Function for the cpu and cuda backends.

``lnlm_ssm._C`` defines the schemas ``torch.ops.lnlm_ssm.selective_scan_fwd`` and
``selective_scan_bwd`` (csrc/cpu/registration.cpp) with their CPU kernels;
``lnlm_ssm._cuda`` adds CUDA kernels to the same schemas, and the dispatcher
picks one by device. The two kernels read different layouts, so ``cpu.py`` and
``cuda.py`` bring the inputs to theirs with differentiable torch ops before
:class:`SelectiveScan`, which returns the gradients in that layout: autograd
takes them back through the backends' casts, transposes and padding.

The forward saves the state entering every ``checkpoint_every`` steps instead
of every state; the backward recomputes each chunk's states from its checkpoint.
"""

from __future__ import annotations

import torch

from lnlm_ssm.ops import _library

_ops = _library.load()


class SelectiveScan(torch.autograd.Function):
    """(out, last_state) of the scan, for inputs in the layout of their device's kernel."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, checkpoint_every):
        # The checkpoints are only written when a backward will read them.
        checkpoint_every = checkpoint_every if any(ctx.needs_input_grad) else 0
        out, last_state, checkpoints = _ops.selective_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, checkpoint_every
        )
        if checkpoint_every:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints)
            ctx.config = (delta_softplus, checkpoint_every)
            ctx.has_initial_state = initial_state is not None
        return out, last_state

    @staticmethod
    def backward(ctx, grad_out, grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
        grad_out, grad_last_state = grad_out.to(u.dtype), grad_last_state.to(A.dtype)
        if u.device.type == "cpu":
            # The CPU kernel reads every tensor contiguous; the CUDA kernel takes strides.
            grad_out, grad_last_state = grad_out.contiguous(), grad_last_state.contiguous()
        du, ddelta, dA, dB, dC, dD, dz, dbias, dinit = _ops.selective_scan_bwd(
            grad_out, grad_last_state, u, delta, A, B, C, D, z, delta_bias, checkpoints, *ctx.config
        )
        # The kernels return empty gradients for absent inputs, which get None.
        return (
            du,
            ddelta,
            dA,
            dB,
            dC,
            None if D is None else dD,
            None if z is None else dz,
            None if delta_bias is None else dbias,
            dinit if ctx.has_initial_state else None,
            None,
            None,
        )
