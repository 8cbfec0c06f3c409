"""Mamba-2 SSD chunked scan on the CPU: the C++ kernels of ``csrc/cpu/ssd.cpp`` in autograd.

The forward saves the inputs and the state entering each chunk, (batch, nheads,
nchunks, headdim, dstate) in the math dtype (a quarter of x's size in fp32 at
dstate 64, chunk 256); the backward recomputes the decays and, when there is a
gate z, y from them. Each op runs its matrix products chunk by chunk inside
one parallel loop (see the C++ for why), with a hand-written backward. The
entering states are also an output, differentiable: ``varlen.py`` makes the
varlen states from them, and their gradient joins the backward's.
"""

from __future__ import annotations

import torch

from lnlm_ssm.ops import _library
from lnlm_ssm.ops.ssd.reference import dt_clamp_bounds, scan_outputs
from lnlm_ssm.ops.ssd.varlen import varlen_states
from lnlm_ssm.utils.checks import NO_DT_LIMIT
from lnlm_ssm.utils.dtypes import math_dtype

_ops = _library.load()


def _opt(t, dtype=None):
    if t is None:
        return None
    return (t if dtype is None else t.to(dtype)).contiguous()


class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_min, dt_max):
        acc = math_dtype(x.dtype)
        nheads, headdim = x.shape[2], x.shape[3]
        # D per head or per channel: the kernel takes (nheads, headdim).
        D_full = None if D is None else (D[:, None] if D.ndim == 1 else D).to(acc).expand(nheads, headdim).contiguous()
        args = (
            x.contiguous(),
            dt.to(acc).contiguous(),
            A.to(acc).contiguous(),
            B.to(acc).contiguous(),
            C.to(acc).contiguous(),
            D_full,
            _opt(z),
            _opt(dt_bias, acc),
        )
        seq_idx = _opt(seq_idx, torch.int64)
        config = (chunk_size, dt_softplus, dt_min, dt_max)
        out, final_states, chunk_states = _ops.ssd_chunk_scan_fwd(
            *args, _opt(initial_states, acc), seq_idx, *config
        )
        ctx.save_for_backward(*args, seq_idx, chunk_states)
        ctx.config = config
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (dt, A, B, C, D, dt_bias, initial_states))
        ctx.D_per_head = D is not None and D.ndim == 1
        ctx.set_materialize_grads(False)
        return out, final_states, chunk_states

    @staticmethod
    def backward(ctx, grad_out, grad_final_states, grad_chunk_states):
        x, dt, A, B, C, D, z, dt_bias, seq_idx, chunk_states = ctx.saved_tensors
        dt_dtype, A_dtype, B_dtype, C_dtype, D_dtype, bias_dtype, init_dtype = ctx.dtypes
        grad_out = torch.zeros_like(x) if grad_out is None else grad_out.to(x.dtype).contiguous()
        dx, ddt, dA, dB, dC, dD, dz, dinit = _ops.ssd_chunk_scan_bwd(
            grad_out, _opt(grad_final_states, A.dtype), _opt(grad_chunk_states, A.dtype),
            x, dt, A, B, C, D, z, dt_bias, seq_idx, chunk_states, *ctx.config
        )
        if D_dtype is not None:
            dD = (dD.sum(-1) if ctx.D_per_head else dD).to(D_dtype)
        return (
            dx,
            ddt.to(dt_dtype),
            dA.to(A_dtype),
            dB.to(B_dtype),
            dC.to(C_dtype),
            dD if D_dtype is not None else None,
            dz if z is not None else None,
            ddt.sum((0, 1)).to(bias_dtype) if bias_dtype is not None else None,
            dinit.to(init_dtype) if init_dtype is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def mamba_chunk_scan_cpu(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=NO_DT_LIMIT,
    return_final_states=False,
    return_varlen_states=False,
    *,
    state_dtype=None,
):
    low, high = dt_clamp_bounds(dt_limit)
    out, final_states, chunk_states = _ChunkScan.apply(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, bool(dt_softplus), low, high
    )
    varlen = None
    if return_varlen_states:
        varlen = varlen_states(
            chunk_states[0].transpose(0, 1), x, dt, A, B, cu_seqlens, chunk_size, dt_bias, dt_softplus, dt_limit
        )
    return scan_outputs(out, final_states, varlen, C, return_final_states, state_dtype)
