"""Mamba-2 SSD chunked scan in Triton: launchers, ``torch.library`` ops and autograd.

Forward, one kernel per stage (``triton_kernels.py``): chunk cumsum of dt*A,
C B^T per group, each chunk's own state, state passing across chunks (the only
sequential loop, over chunks, inside one kernel), chunk scan (+ D x, z gate).
Backward: the z gate and dD are elementwise torch; everything else is Triton:
the gradient of each entering state from the outputs, reverse state passing
(gives d initial_states and the gradient of every chunk's final state), dx with
dt's direct gradient, dC and dB (summing a group's heads) with the gradient of
the cumsums, and a reverse cumsum that maps it onto dt, A and dt_bias.

Saved for the backward: the inputs, the fp32 cumsums and dt (b, h, c, T), C B^T
(b, c, g, T, T), the states entering each chunk (b, c, h, p, n) and, with z,
the output before the gate (fp32). The entering states are also an output,
differentiable: ``varlen.py`` makes the varlen states from them, and their
gradient joins that of each entering state from the outputs.

Block sizes come from the shapes, not autotuning: first calls stay fast and the
same sizes are valid on Ampere and Hopper. Both launchers are torch ops
(``_triton.library_op``), so ``torch.compile`` sees the kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from lnlm_ssm.ops._triton import library_op as _library_op
from lnlm_ssm.ops._triton import wrap as _wrap
# Kernels are looked up on their modules at each launch, so that a test can reload
# them under TRITON_INTERPRET=1 (Triton picks compiled or interpreted at @triton.jit).
from lnlm_ssm.ops.ssd import triton_kernels as _fwd
from lnlm_ssm.ops.ssd import triton_kernels_bwd as _bwd
from lnlm_ssm.ops.ssd.reference import dt_clamp_bounds, scan_outputs
from lnlm_ssm.ops.ssd.varlen import varlen_states
from lnlm_ssm.utils.checks import NO_DT_LIMIT

_STATE_BLOCK = 256  # elements of one (p, n) state per program in state passing


def _block(size: int, cap: int = 64) -> int:
    # tl.dot needs every block dimension >= 16.
    return max(16, min(cap, triton.next_power_of_2(size)))


def _strides(t: Optional[torch.Tensor], ndim: int):
    return tuple(t.stride()) if t is not None else (0,) * ndim


def _dot_mode(x: torch.Tensor, B: torch.Tensor) -> int:
    if x.dtype == torch.float32 or B.dtype != x.dtype:
        return _fwd.DOT_FP32
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":  # the interpreter
        return _fwd.DOT_LOWP_VIA_FP32
    return _fwd.DOT_LOWP


def _heads_per_prog(heads_per_group: int) -> int:
    # Enough programs to fill the GPU at large head counts; a divisor so slices are whole.
    return max(d for d in range(1, min(heads_per_group, 8) + 1) if heads_per_group % d == 0)


def _chunk_cumsum(dt, A, dt_bias, chunk_size, nchunks, dt_softplus, dt_min, dt_max):
    batch, seqlen, nheads = dt.shape
    dt_out = dt.new_empty(batch, nheads, nchunks, chunk_size, dtype=torch.float32)
    cs = torch.empty_like(dt_out)
    block_h = min(triton.next_power_of_2(nheads), max(1, 4096 // triton.next_power_of_2(chunk_size)))
    grid = (batch, nchunks, triton.cdiv(nheads, block_h))
    _wrap(_fwd.chunk_cumsum_fwd_kernel)[grid](
        dt, A, dt_bias if dt_bias is not None else A, dt_out, cs,
        seqlen, nheads, nchunks, chunk_size, *dt.stride(), dt_min, dt_max,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        BLOCK_T=triton.next_power_of_2(chunk_size), BLOCK_H=block_h,
    )
    return dt_out, cs


def _chunk_state(x, y, dt_out, cs, seq_idx, chunk_size, nchunks, from_start, mode):
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = y.shape[2], y.shape[3]
    out = x.new_empty(batch, nchunks, nheads, headdim, dstate, dtype=torch.float32)
    block_p, block_n = _block(headdim), _block(dstate)
    grid = (batch * nchunks * nheads, triton.cdiv(headdim, block_p), triton.cdiv(dstate, block_n))
    _wrap(_fwd.chunk_state_kernel)[grid](
        x, y, dt_out, cs, seq_idx if seq_idx is not None else cs, out,
        seqlen, nheads, ngroups, nchunks, chunk_size, headdim, dstate,
        *x.stride(), *y.stride(), *_strides(seq_idx, 2),
        FROM_START=from_start, HAS_SEQ=seq_idx is not None, MODE=mode,
        BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_K=_block(chunk_size),
    )
    return out


def _ssd_fwd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    initial_states: Optional[torch.Tensor],
    seq_idx: Optional[torch.Tensor],
    chunk_size: int,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, out before the gate (empty without z), final states, entering states, dt, cumsums, C B^T)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks = max(1, triton.cdiv(seqlen, chunk_size))
    mode = _dot_mode(x, B)
    has_seq = seq_idx is not None
    seq_arg = seq_idx if has_seq else A
    seq_strides = _strides(seq_idx, 2)

    dt_out, cs = _chunk_cumsum(dt, A, dt_bias, chunk_size, nchunks, dt_softplus, dt_min, dt_max)

    cb = x.new_empty(batch, nchunks, ngroups, chunk_size, chunk_size, dtype=torch.float32)
    block_t = _block(chunk_size)
    _wrap(_fwd.bmm_cb_kernel)[(batch * nchunks * ngroups, triton.cdiv(chunk_size, block_t), triton.cdiv(chunk_size, block_t))](
        C, B, cb, seqlen, ngroups, nchunks, chunk_size, dstate, *B.stride(), *C.stride(),
        MODE=_dot_mode(B, B), BLOCK_M=block_t, BLOCK_N=block_t, BLOCK_K=_block(dstate),
    )

    states = _chunk_state(x, B, dt_out, cs, seq_idx, chunk_size, nchunks, False, mode)
    final_states = x.new_empty(batch, nheads, headdim, dstate, dtype=torch.float32)
    dim = headdim * dstate
    _wrap(_fwd.state_passing_fwd_kernel)[(batch, nheads, triton.cdiv(dim, _STATE_BLOCK))](
        states, initial_states if initial_states is not None else states, cs, seq_arg, final_states,
        seqlen, nheads, nchunks, chunk_size, dim, *seq_strides,
        HAS_INIT=initial_states is not None, HAS_SEQ=has_seq, BLOCK=_STATE_BLOCK,
    )

    out = x.new_empty(batch, seqlen, nheads, headdim)
    # fp32: dz from a half-precision copy would err by more than the inputs' rounding.
    out_x = torch.empty_like(out, dtype=torch.float32) if z is not None else out.new_empty(0)
    block_p = _block(headdim)
    grid = (batch * nchunks * nheads, triton.cdiv(chunk_size, block_t), triton.cdiv(headdim, block_p))
    _wrap(_fwd.chunk_scan_fwd_kernel)[grid](
        cb, x, z if z is not None else x, dt_out, cs, C, states, D if D is not None else cs, seq_arg, out, out_x,
        seqlen, nheads, ngroups, nchunks, chunk_size, headdim, dstate,
        *x.stride(), *_strides(z, 4), *C.stride(), *seq_strides,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_SEQ=has_seq, MODE=mode,
        BLOCK_M=block_t, BLOCK_N=block_p, BLOCK_K=block_t, BLOCK_DSTATE=_block(dstate),
    )
    return out, out_x, final_states, states, dt_out, cs, cb


def _ssd_bwd(
    grad_out: torch.Tensor,
    grad_final_states: Optional[torch.Tensor],
    grad_states: Optional[torch.Tensor],
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    seq_idx: Optional[torch.Tensor],
    out_x: torch.Tensor,
    states: torch.Tensor,
    dt_out: torch.Tensor,
    cs: torch.Tensor,
    cb: torch.Tensor,
    chunk_size: int,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
]:
    """(dx, ddt, dA, dB, dC, dD (h, p), dz, ddt_bias, d initial_states); fp32 but dx, dz; unused ones empty."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks = cs.shape[2]
    mode = _dot_mode(x, B)
    has_seq = seq_idx is not None
    seq_arg = seq_idx if has_seq else A
    seq_strides = _strides(seq_idx, 2)

    if z is not None:
        gate = torch.sigmoid(z.float())
        silu_grad = gate * (1 + z.float() * (1 - gate))
        dz = (grad_out.float() * out_x.float() * silu_grad).to(z.dtype)
        # Kept in fp32: rounding it to x's half precision would cost more than the inputs' rounding.
        dy = grad_out.float() * z.float() * gate
    else:
        dz = x.new_empty(0)
        dy = grad_out
    dD = (dy.float() * x.float()).sum((0, 1)) if D is not None else A.new_empty(0, dtype=torch.float32)

    # Gradient of each chunk's entering state from its outputs, then passed backwards:
    # dstates[c] becomes the gradient of the state leaving chunk c.
    dstates = _chunk_state(dy, C, dt_out, cs, seq_idx, chunk_size, nchunks, True, mode)
    if grad_states is not None:
        dstates += grad_states
    dim = headdim * dstate
    nblocks = triton.cdiv(dim, _STATE_BLOCK)
    dinit = x.new_empty(batch, nheads, headdim, dstate, dtype=torch.float32)
    dlast_passing = x.new_empty(batch, nheads, nchunks, nblocks, dtype=torch.float32)
    _wrap(_fwd.state_passing_bwd_kernel)[(batch, nheads, nblocks)](
        states, dstates, grad_final_states if grad_final_states is not None else dinit, cs, seq_arg, dinit,
        dlast_passing, seqlen, nheads, nchunks, chunk_size, dim, *seq_strides,
        HAS_DFINAL=grad_final_states is not None, HAS_SEQ=has_seq, BLOCK=_STATE_BLOCK,
    )

    block_t, block_p = _block(chunk_size), _block(headdim)
    grid = (batch * nchunks * nheads, triton.cdiv(chunk_size, block_t), triton.cdiv(headdim, block_p))
    dx = x.new_empty(batch, seqlen, nheads, headdim)
    ddt_direct = x.new_empty(grid[2], batch, nheads, nchunks, chunk_size, dtype=torch.float32)
    _wrap(_bwd.chunk_scan_bwd_dx_kernel)[grid](
        x, dy, cb, dt_out, cs, B, dstates, D if D is not None else cs, seq_arg, dx, ddt_direct,
        seqlen, nheads, ngroups, nchunks, chunk_size, headdim, dstate,
        *x.stride(), *dy.stride(), *B.stride(), *seq_strides,
        HAS_D=D is not None, HAS_SEQ=has_seq, MODE=mode, DY_EXACT=z is None,
        BLOCK_M=block_t, BLOCK_N=block_p, BLOCK_K=block_t, BLOCK_DSTATE=_block(dstate),
    )

    heads_per_prog = _heads_per_prog(nheads // ngroups)
    splits = nheads // ngroups // heads_per_prog
    block_r = _block(chunk_size, 32)
    grid = (batch * nchunks * ngroups, triton.cdiv(chunk_size, block_r), splits)
    dcs = x.new_empty(batch, nheads, nchunks, chunk_size, dtype=torch.float32)
    dlast_B = x.new_empty(batch, nheads, nchunks, grid[1], dtype=torch.float32)
    grads = {}
    # dC first: it writes dcs, which the dB pass then adds to.
    for for_B in (False, True):
        partial = x.new_empty(splits, batch, seqlen, ngroups, dstate, dtype=torch.float32)
        _wrap(_bwd.chunk_scan_bwd_dbc_kernel)[grid](
            x, dy, B, C, dt_out, cs, dstates if for_B else states, seq_arg, partial, dcs, dlast_B,
            seqlen, nheads, ngroups, nchunks, chunk_size, headdim, dstate, heads_per_prog,
            *x.stride(), *dy.stride(), *B.stride(), *C.stride(), *seq_strides,
            FOR_B=for_B, HAS_SEQ=has_seq, MODE=mode, DY_EXACT=z is None,
            BLOCK_M=block_r, BLOCK_K=block_r, BLOCK_P=_block(headdim, 1 << 30), BLOCK_N=_block(dstate, 1 << 30),
            num_warps=8,
        )
        grads[for_B] = partial.sum(0)

    ddt = x.new_empty(batch, seqlen, nheads, dtype=torch.float32)
    dA_part = x.new_empty(batch, nchunks, nheads, dtype=torch.float32)
    dbias_part = torch.empty_like(dA_part)
    block_h = min(triton.next_power_of_2(nheads), max(1, 4096 // triton.next_power_of_2(chunk_size)))
    # dt is read and ddt written with one set of strides.
    _wrap(_fwd.chunk_cumsum_bwd_kernel)[(batch, nchunks, triton.cdiv(nheads, block_h))](
        dt.contiguous(), A, dt_bias if dt_bias is not None else A, dt_out, dcs,
        dlast_passing.sum(-1) + dlast_B.sum(-1), ddt_direct.sum(0), ddt, dA_part, dbias_part,
        seqlen, nheads, nchunks, chunk_size, *ddt.stride(), dt_min, dt_max,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        BLOCK_T=triton.next_power_of_2(chunk_size), BLOCK_H=block_h,
    )
    dbias = dbias_part.sum((0, 1)) if dt_bias is not None else A.new_empty(0, dtype=torch.float32)
    return dx, ddt, dA_part.sum((0, 1)), grads[True], grads[False], dD, dz, dbias, dinit


def _ssd_fwd_fake(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_min, dt_max):
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks = max(1, triton.cdiv(seqlen, chunk_size))
    f32 = torch.float32
    return (
        x.new_empty(batch, seqlen, nheads, headdim),
        x.new_empty(batch, seqlen, nheads, headdim, dtype=f32) if z is not None else x.new_empty(0),
        x.new_empty(batch, nheads, headdim, dstate, dtype=f32),
        x.new_empty(batch, nchunks, nheads, headdim, dstate, dtype=f32),
        x.new_empty(batch, nheads, nchunks, chunk_size, dtype=f32),
        x.new_empty(batch, nheads, nchunks, chunk_size, dtype=f32),
        x.new_empty(batch, nchunks, ngroups, chunk_size, chunk_size, dtype=f32),
    )


def _ssd_bwd_fake(
    grad_out, grad_final_states, grad_states, x, dt, A, B, C, D, z, dt_bias, seq_idx, out_x, states, dt_out, cs, cb, chunk_size,
    dt_softplus, dt_min, dt_max,
):
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    f32 = torch.float32
    return (
        x.new_empty(batch, seqlen, nheads, headdim),
        x.new_empty(batch, seqlen, nheads, dtype=f32),
        x.new_empty(nheads, dtype=f32),
        x.new_empty(batch, seqlen, ngroups, dstate, dtype=f32),
        x.new_empty(batch, seqlen, ngroups, dstate, dtype=f32),
        x.new_empty(nheads, headdim, dtype=f32) if D is not None else x.new_empty(0, dtype=f32),
        z.new_empty(batch, seqlen, nheads, headdim) if z is not None else x.new_empty(0),
        x.new_empty(nheads, dtype=f32) if dt_bias is not None else x.new_empty(0, dtype=f32),
        x.new_empty(batch, nheads, headdim, dstate, dtype=f32),
    )


_ssd_fwd_op = _library_op("ssd_chunk_scan_fwd", _ssd_fwd, (), _ssd_fwd_fake)
_ssd_bwd_op = _library_op("ssd_chunk_scan_bwd", _ssd_bwd, (), _ssd_bwd_fake)


class _ChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, dt_softplus, dt_min, dt_max):
        nheads, headdim = x.shape[2], x.shape[3]
        # D per head or per channel: the kernels take (nheads, headdim) fp32.
        D_full = None if D is None else (D[:, None] if D.ndim == 1 else D).float().expand(nheads, headdim).contiguous()
        A32 = A.float().contiguous()
        bias32 = None if dt_bias is None else dt_bias.float().contiguous()
        init32 = None if initial_states is None else initial_states.float().contiguous()
        out, out_x, final_states, states, dt_out, cs, cb = _ssd_fwd_op(
            x, dt, A32, B, C, D_full, z, bias32, init32, seq_idx, chunk_size, dt_softplus, dt_min, dt_max
        )
        ctx.save_for_backward(x, dt, A32, B, C, D_full, z, bias32, seq_idx, out_x, states, dt_out, cs, cb)
        ctx.config = (chunk_size, dt_softplus, dt_min, dt_max)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (A, D, dt_bias, initial_states))
        ctx.D_per_head = D is not None and D.ndim == 1
        ctx.set_materialize_grads(False)
        return out, final_states, states

    @staticmethod
    def backward(ctx, grad_out, grad_final_states, grad_states):
        x, dt, A, B, C, D, z, dt_bias, seq_idx, out_x, states, dt_out, cs, cb = ctx.saved_tensors
        A_dtype, D_dtype, bias_dtype, init_dtype = ctx.dtypes
        grad_out = torch.zeros_like(x) if grad_out is None else grad_out.to(x.dtype)
        if grad_final_states is not None:
            grad_final_states = grad_final_states.float().contiguous()
        if grad_states is not None:
            grad_states = grad_states.float().contiguous()
        dx, ddt, dA, dB, dC, dD, dz, dbias, dinit = _ssd_bwd_op(
            grad_out, grad_final_states, grad_states, x, dt, A, B, C, D, z, dt_bias, seq_idx, out_x, states, dt_out,
            cs, cb, *ctx.config,
        )
        if D_dtype is not None:
            dD = (dD.sum(-1) if ctx.D_per_head else dD).to(D_dtype)
        return (
            dx,
            ddt.to(dt.dtype),
            dA.to(A_dtype),
            dB.to(B.dtype),
            dC.to(C.dtype),
            dD if D_dtype is not None else None,
            dz if z is not None else None,
            dbias.to(bias_dtype) if bias_dtype is not None else None,
            dinit.to(init_dtype) if init_dtype is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def mamba_chunk_scan_triton(
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
    out, final_states, states = _ChunkScan.apply(
        x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, bool(dt_softplus), low, high
    )
    varlen = None
    if return_varlen_states:
        varlen = varlen_states(states[0], x, dt, A, B, cu_seqlens, chunk_size, dt_bias, dt_softplus, dt_limit)
    return scan_outputs(out, final_states, varlen, C, return_final_states, state_dtype)
