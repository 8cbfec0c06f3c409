"""Mamba-1 selective scan in Triton: one fused pass forward, a chunked recomputing backward.

Forward: each thread owns one channel of one (batch, group) and walks time in
tiles of ``FWD_TILE`` steps, looping over the dstate states one at a time, so
the recurrence ``h_t = a_t h_{t-1} + x_t`` is scanned inside the thread (no
shuffles) and its (dstate,) state stays in registers. u, delta, z, B and C are
read once, along seqlen, and y is written once.

When gradients are needed the forward also stores the state entering every
chunk of ``CHUNK`` steps, (batch, dim, nchunks, dstate) in fp32. The backward
(``BWD_BLOCK_D`` channels per program, (channels, dstate, CHUNK) tiles scanned
with ``tl.associative_scan``) walks the chunks in reverse: it recomputes
the chunk's states from that checkpoint, runs the adjoint recurrence
``g_t = C_t dy_t + a_{t+1} g_{t+1}`` as a reverse scan, and reduces the
gradients without ever storing a (batch, dim, seqlen, dstate) tensor:

- dA, dD and d(delta_bias) are per channel: each program sums over its batch
  row and time in registers, writes one (batch, ...) partial, and the batch
  sum is done by torch (deterministic);
- time-varying dB and dC are shared by the channels of a group: each program
  sums its channels first, then adds its (dstate, CHUNK) tile into an fp32
  buffer with atomics, so their summation order (not their value) can vary run
  to run; a time-invariant (dim, dstate) B or C is per channel, and its
  gradient is summed like dA's.

Complex A has its own pair of kernels (see ``_fwd_kernel_complex``).

Math and state are fp32 (complex64 for complex A) for fp32, bf16 and fp16
inputs; float64 is left to the reference and cpu backends. Gradients flow
through the last state and into ``initial_state``, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from lnlm_ssm.ops._triton import library_op as _library_op
from lnlm_ssm.ops._triton import refuse_float64
from lnlm_ssm.ops._triton import wrap as _wrap

# Steps per chunk: the time tile of both kernels and the checkpoint interval of
# the backward. The checkpoints cost dstate * 4 / CHUNK bytes per element of u
# (1 byte at dstate 16), written only when a gradient is needed.
CHUNK = 64

# Steps each thread of the forward scans in registers (CHUNK must be a
# multiple). 16 spills registers and brings back shuffles (sm_80 and sm_90).
FWD_TILE = 8

# The backward holds about ten (BLOCK_D, dstate, CHUNK) fp32 tiles at once, so
# it takes fewer channels per program than the forward.
BWD_BLOCK_D = 2
BWD_NUM_WARPS = 4

LOG2E = tl.constexpr(1.4426950408889634)

# One channel per thread (BLOCK_D = 32 * num_warps), see _fwd_kernel. Kept
# small so that a first call (which tries each) stays quick; valid on Ampere
# and Hopper. The interpreter, which would time every config (slowly) and
# has no threads, runs one narrow block.
_FWD_CONFIGS = [triton.Config({"BLOCK_D": 32 * warps}, num_warps=warps) for warps in (1, 2, 4)]
if knobs.runtime.interpret:
    _FWD_CONFIGS = [triton.Config({"BLOCK_D": 8}, num_warps=1)]


@triton.jit
def _compose(decay_a, drive_a, decay_b, drive_b):
    # Step a then step b, each h -> decay * h + drive. In a reverse scan the
    # first pair is the later steps, which the adjoint recurrence applies first.
    return decay_b * decay_a, decay_b * drive_a + drive_b


@triton.jit
def _softplus(x):
    # torch's softplus (threshold 20), with log1p written out: log(1 + e)
    # rounds 1 + e and loses e when e is tiny; the ratio e / ((1 + e) - 1)
    # restores the rounding error (Goldberg's log1p).
    e = tl.exp(x)
    one_plus = 1.0 + e
    log1p = tl.where(one_plus == 1.0, e, tl.log(one_plus) * (e / (one_plus - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _load_delta(ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(delta + bias, the step size Δ): Δ is 0 outside ``mask`` so that padded steps leave the state as it is."""
    pre = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre += bias[:, None]
    step = pre
    if SOFTPLUS:
        step = _softplus(pre)
    return pre, tl.where(mask, step, 0.0)


@triton.autotune(configs=_FWD_CONFIGS, key=["per_group", "dstate"])
@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, last_ptr, ckpt_ptr,
    ngroups, per_group, seqlen, dstate, nchunks,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_z_b, s_z_d, s_z_l,
    s_A_d, s_A_n,
    s_B_b, s_B_g, s_B_d, s_B_n, s_B_l,
    s_C_b, s_C_g, s_C_d, s_C_n, s_C_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, SAVE_CKPT: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
    DSTATE: tl.constexpr, NSTATE: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Tiles are (TILE steps, BLOCK_D channels) and BLOCK_D = 32 * num_warps:
    # each thread owns one channel and TILE consecutive steps, so the scan
    # along time runs inside the thread (no shuffles) and the states, looped
    # over one at a time, never need a reduction across threads.
    b = tl.program_id(1) // ngroups
    g = tl.program_id(1) % ngroups
    ch = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = ch < per_group
    d = (g * per_group + ch).to(tl.int64)
    n = tl.arange(0, DSTATE)
    mask_nd = (n < dstate)[:, None] & mask_d[None, :]
    dim = ngroups * per_group

    # (DSTATE, BLOCK_D): the states of a channel sit in its thread.
    A2 = tl.load(A_ptr + d[None, :] * s_A_d + n[:, None] * s_A_n, mask=mask_nd, other=0.0).to(tl.float32) * LOG2E
    bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0) if HAS_BIAS else None
    skip = tl.load(D_ptr + d, mask=mask_d, other=0.0) if HAS_D else None
    state_offs = (b * dim + d)[None, :] * dstate + n[:, None]
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask_nd, other=0.0)
    else:
        h = tl.zeros((DSTATE, BLOCK_D), dtype=tl.float32)

    u_col = u_ptr + b * s_u_b + d[None, :] * s_u_d
    dt_col = delta_ptr + b * s_dt_b + d[None, :] * s_dt_d
    z_col = z_ptr + b * s_z_b + d[None, :] * s_z_d
    y_col = y_ptr + (b * dim + d)[None, :] * seqlen
    B_row = B_ptr + b * s_B_b + g * s_B_g
    C_row = C_ptr + b * s_C_b + g * s_C_g
    ckpt = ckpt_ptr + (b * dim + d)[None, :] * nchunks * dstate + n[:, None]
    local = tl.arange(0, TILE)
    first = local[:, None] == 0
    last = local[:, None] == TILE - 1

    for i in range(0, tl.cdiv(seqlen, TILE)):
        if SAVE_CKPT:
            if i % (CHUNK // TILE) == 0:
                tl.store(ckpt + (i // (CHUNK // TILE)) * dstate, h, mask=mask_nd)
        t = i * TILE + local
        mask_t = t < seqlen
        mask = mask_t[:, None] & mask_d[None, :]
        u = tl.load(u_col + t[:, None] * s_u_l, mask=mask, other=0.0).to(tl.float32)
        pre = tl.load(dt_col + t[:, None] * s_dt_l, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            pre += bias[None, :]
        step = _softplus(pre) if SOFTPLUS else pre
        # Δ = 0 past seqlen: the padded steps leave the state as it is.
        step = tl.where(mask, step, 0.0)
        step_u = step * u
        y = tl.zeros((TILE, BLOCK_D), dtype=tl.float32)
        for k in tl.static_range(NSTATE):
            is_k = n[:, None] == k
            # Time-varying: one value per step, shared by the channels; time-invariant: one per channel.
            if VAR_B:
                B_k = tl.load(B_row + k * s_B_n + t * s_B_l, mask=mask_t, other=0.0).to(tl.float32)[:, None]
            else:
                B_k = tl.load(B_ptr + d * s_B_d + k * s_B_n, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            if VAR_C:
                C_k = tl.load(C_row + k * s_C_n + t * s_C_l, mask=mask_t, other=0.0).to(tl.float32)[:, None]
            else:
                C_k = tl.load(C_ptr + d * s_C_d + k * s_C_n, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            decay = tl.exp2(step * tl.sum(tl.where(is_k, A2, 0.0), axis=0)[None, :])
            drive = step_u * B_k
            # The state carried in from the previous tile enters with the first step's drive.
            h_k = tl.sum(tl.where(is_k, h, 0.0), axis=0)
            drive = tl.where(first, drive + decay * h_k[None, :], drive)
            _, states = tl.associative_scan((decay, drive), axis=0, combine_fn=_compose)
            y += states * C_k
            h = tl.where(is_k, tl.sum(tl.where(last, states, 0.0), axis=0)[None, :], h)
        if HAS_D:
            y += skip[None, :] * u
        if HAS_Z:
            zt = tl.load(z_col + t[:, None] * s_z_l, mask=mask, other=0.0).to(tl.float32)
            y *= zt * tl.sigmoid(zt)
        tl.store(y_col + t[:, None], y.to(y_ptr.dtype.element_ty), mask=mask)

    tl.store(last_ptr + state_offs, h, mask=mask_nd)


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dy_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    ngroups, per_group, seqlen, dstate, nchunks,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_z_b, s_z_d, s_z_l,
    s_dy_b, s_dy_d, s_dy_l,
    s_A_d, s_A_n,
    s_B_b, s_B_g, s_B_d, s_B_n, s_B_l,
    s_C_b, s_C_g, s_C_d, s_C_n, s_C_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr,
    SOFTPLUS: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
    DSTATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1) // ngroups
    g = tl.program_id(1) % ngroups
    ch = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = ch < per_group
    d = (g * per_group + ch).to(tl.int64)
    n = tl.arange(0, DSTATE)
    mask_n = n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dim = ngroups * per_group

    A = tl.load(A_ptr + d[:, None] * s_A_d + n[None, :] * s_A_n, mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0) if HAS_BIAS else None
    skip = tl.load(D_ptr + d, mask=mask_d, other=0.0) if HAS_D else None
    state_offs = (b * dim + d)[:, None] * dstate + n[None, :]
    # carry: the gradient reaching the state before the chunk just processed,
    # a_t0 g_t0; before the first (last in time) chunk, the gradient of the last state.
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + state_offs, mask=mask_dn, other=0.0)
    else:
        carry = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
    dA = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
    # A time-invariant B or C: (BLOCK_D, DSTATE, 1) for the whole sequence, its gradient summed here like dA's.
    if not VAR_B:
        B_fixed = tl.load(B_ptr + d[:, None] * s_B_d + n[None, :] * s_B_n, mask=mask_dn, other=0.0)
        B_fixed = B_fixed.to(tl.float32)[:, :, None]
        dB_fixed = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
    if not VAR_C:
        C_fixed = tl.load(C_ptr + d[:, None] * s_C_d + n[None, :] * s_C_n, mask=mask_dn, other=0.0)
        C_fixed = C_fixed.to(tl.float32)[:, :, None]
        dC_fixed = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)

    u_row = u_ptr + b * s_u_b + d[:, None] * s_u_d
    dt_row = delta_ptr + b * s_dt_b + d[:, None] * s_dt_d
    z_row = z_ptr + b * s_z_b + d[:, None] * s_z_d
    dy_row = dy_ptr + b * s_dy_b + d[:, None] * s_dy_d
    out_row = (b * dim + d)[:, None] * seqlen
    B_rows = B_ptr + b * s_B_b + g * s_B_g + n[:, None] * s_B_n
    C_rows = C_ptr + b * s_C_b + g * s_C_g + n[:, None] * s_C_n
    dBC_rows = ((b * ngroups + g) * dstate + n)[:, None] * seqlen
    ckpt = ckpt_ptr + (b * dim + d)[:, None] * nchunks * dstate + n[None, :]
    local = tl.arange(0, CHUNK)
    first_step = local[None, None, :] == 0

    for i in range(0, nchunks):
        c = nchunks - 1 - i
        t = c * CHUNK + local
        mask_t = t < seqlen
        mask = mask_d[:, None] & mask_t[None, :]
        mask_nt = mask_n[:, None] & mask_t[None, :]

        # Recompute the chunk's states from its checkpoint, as the forward did.
        h0 = tl.load(ckpt + c * dstate, mask=mask_dn, other=0.0)
        u = tl.load(u_row + t[None, :] * s_u_l, mask=mask, other=0.0).to(tl.float32)
        pre, step = _load_delta(dt_row + t[None, :] * s_dt_l, mask, bias, HAS_BIAS, SOFTPLUS)
        # Bt, Ct broadcast to (BLOCK_D, DSTATE, CHUNK).
        if VAR_B:
            Bt = tl.load(B_rows + t[None, :] * s_B_l, mask=mask_nt, other=0.0).to(tl.float32)[None, :, :]
        else:
            Bt = B_fixed
        if VAR_C:
            Ct = tl.load(C_rows + t[None, :] * s_C_l, mask=mask_nt, other=0.0).to(tl.float32)[None, :, :]
        else:
            Ct = C_fixed
        decay = tl.exp2(step[:, None, :] * A2[:, :, None])
        drive = (step * u)[:, None, :] * Bt
        cum_decay, cum_drive = tl.associative_scan((decay, drive), axis=2, combine_fn=_compose)
        states = cum_decay * h0[:, :, None] + cum_drive

        # Output side: y = (C·h + D u) * silu(z).
        dy = tl.load(dy_row + t[None, :] * s_dy_l, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_row + t[None, :] * s_z_l, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zt)
            y = tl.sum(states * Ct, axis=1)
            if HAS_D:
                y += skip[:, None] * u
            dz = dy * y * sig * (1.0 + zt * (1.0 - sig))
            tl.store(dz_ptr + out_row + t[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
            dy = dy * zt * sig
        du = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)
        if HAS_D:
            dD += tl.sum(dy * u, axis=1)
            du += skip[:, None] * dy

        # Adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1}, a reverse scan
        # whose decay at t is that of step t + 1: the next step's Δ is loaded
        # again (from cache). At the chunk's last step it is 1, and the carry
        # from the later chunks enters as prod_{r=t+1..} a_r * carry.
        next_t = t + 1
        mask_next = mask_d[:, None] & ((local < CHUNK - 1) & (next_t < seqlen))[None, :]
        _, next_step = _load_delta(dt_row + next_t[None, :] * s_dt_l, mask_next, bias, HAS_BIAS, SOFTPLUS)
        next_decay = tl.exp2(next_step[:, None, :] * A2[:, :, None])
        through, grad = tl.associative_scan(
            (next_decay, Ct * dy[:, None, :]), axis=2, combine_fn=_compose, reverse=True
        )
        grad += through * carry[:, :, None]
        carry = tl.sum(tl.where(first_step, decay * grad, 0.0), axis=2)

        # Drive x_t = Δ_t u_t B_t.
        grad_B = tl.sum(grad * Bt, axis=1)
        du += step * grad_B
        dstep = u * grad_B
        # Decay a_t = exp(Δ_t A), entering as a_t h_{t-1} = h_t - x_t.
        grad_decay = grad * (states - drive)
        dstep += tl.sum(grad_decay * A[:, :, None], axis=1)
        dA += tl.sum(grad_decay * step[:, None, :], axis=2)
        if SOFTPLUS:
            dstep *= tl.sigmoid(pre)
        dstep = tl.where(mask, dstep, 0.0)
        dbias += tl.sum(dstep, axis=1)

        if VAR_B:
            dBt = tl.sum(grad * (step * u)[:, None, :], axis=0)
            tl.atomic_add(dB_ptr + dBC_rows + t[None, :], dBt, mask=mask_nt, sem="relaxed")
        else:
            dB_fixed += tl.sum(grad * (step * u)[:, None, :], axis=2)
        if VAR_C:
            dCt = tl.sum(states * dy[:, None, :], axis=0)
            tl.atomic_add(dC_ptr + dBC_rows + t[None, :], dCt, mask=mask_nt, sem="relaxed")
        else:
            dC_fixed += tl.sum(states * dy[:, None, :], axis=2)
        tl.store(du_ptr + out_row + t[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + out_row + t[None, :], dstep.to(ddelta_ptr.dtype.element_ty), mask=mask)

    tl.store(dh0_ptr + state_offs, carry, mask=mask_dn)
    tl.store(dA_ptr + state_offs, dA, mask=mask_dn)
    if not VAR_B:
        tl.store(dB_ptr + state_offs, dB_fixed, mask=mask_dn)
    if not VAR_C:
        tl.store(dC_ptr + state_offs, dC_fixed, mask=mask_dn)
    tl.store(dD_ptr + b * dim + d, dD, mask=mask_d)
    tl.store(dbias_ptr + b * dim + d, dbias, mask=mask_d)


# Complex A (S4D-style) runs its own pair of kernels, both written like the real
# backward: (channels, dstate, CHUNK) tiles, each chunk's states scanned with
# tl.associative_scan over (decay, drive) pairs of complex numbers held as
# (real, imaginary) tiles. A is read through its (dim, dstate, 2) real view, a
# time-invariant B or C likewise, a time-varying one as mamba_ssm lays it out
# (real, with (real, imaginary) pairs along a last axis of 2 * seqlen), and the
# states are (..., dstate, 2) real views of complex64 tensors.
CPLX_FWD_BLOCK_D = 2
CPLX_BWD_BLOCK_D = 1
CPLX_NUM_WARPS = 4


@triton.jit
def _compose_complex(decay_re_a, decay_im_a, drive_re_a, drive_im_a, decay_re_b, decay_im_b, drive_re_b, drive_im_b):
    # _compose for complex decays and drives: step a then step b.
    return (
        decay_re_b * decay_re_a - decay_im_b * decay_im_a,
        decay_re_b * decay_im_a + decay_im_b * decay_re_a,
        decay_re_b * drive_re_a - decay_im_b * drive_im_a + drive_re_b,
        decay_re_b * drive_im_a + decay_im_b * drive_re_a + drive_im_b,
    )


@triton.jit
def _complex_decay(step, A_re2, A_im):
    """exp(Δ A) = exp(Δ Re A) (cos(Δ Im A) + i sin(Δ Im A)) as (BLOCK_D, DSTATE, CHUNK) tiles.

    A_re2 is Re A log2(e), for exp2.
    """
    magnitude = tl.exp2(step[:, None, :] * A_re2[:, :, None])
    angle = step[:, None, :] * A_im[:, :, None]
    return magnitude * tl.cos(angle), magnitude * tl.sin(angle)


@triton.jit
def _complex_chunk(step, u, A_re2, A_im, B_re, B_im, h_re, h_im):
    """A chunk's states from h, the state entering it: (states, decays, drives), each as (real, imaginary)."""
    decay_re, decay_im = _complex_decay(step, A_re2, A_im)
    step_u = (step * u)[:, None, :]
    drive_re = step_u * B_re
    drive_im = step_u * B_im
    cum_decay_re, cum_decay_im, cum_drive_re, cum_drive_im = tl.associative_scan(
        (decay_re, decay_im, drive_re, drive_im), axis=2, combine_fn=_compose_complex
    )
    states_re = cum_decay_re * h_re[:, :, None] - cum_decay_im * h_im[:, :, None] + cum_drive_re
    states_im = cum_decay_re * h_im[:, :, None] + cum_decay_im * h_re[:, :, None] + cum_drive_im
    return states_re, states_im, decay_re, decay_im, drive_re, drive_im


@triton.jit
def _load_projection_complex(
    ptr, b, g, d, n, t, mask_dn, mask_nt, s_b, s_g, s_d, s_n, s_l, s_c, VARYING: tl.constexpr
):
    """B or C at the steps t, (real, imaginary), broadcastable to (BLOCK_D, DSTATE, CHUNK)."""
    if VARYING:
        rows = ptr + b * s_b + g * s_g + n[:, None] * s_n + t[None, :] * s_l
        re = tl.load(rows, mask=mask_nt, other=0.0).to(tl.float32)[None, :, :]
        im = tl.load(rows + s_c, mask=mask_nt, other=0.0).to(tl.float32)[None, :, :]
    else:
        rows = ptr + d[:, None] * s_d + n[None, :] * s_n
        re = tl.load(rows, mask=mask_dn, other=0.0).to(tl.float32)[:, :, None]
        im = tl.load(rows + s_c, mask=mask_dn, other=0.0).to(tl.float32)[:, :, None]
    return re, im


@triton.jit
def _fwd_kernel_complex(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, last_ptr, ckpt_ptr,
    ngroups, per_group, seqlen, dstate, nchunks,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_z_b, s_z_d, s_z_l,
    s_A_d, s_A_n, s_A_c,
    s_B_b, s_B_g, s_B_d, s_B_n, s_B_l, s_B_c,
    s_C_b, s_C_g, s_C_d, s_C_n, s_C_l, s_C_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, SAVE_CKPT: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
    DSTATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1) // ngroups
    g = tl.program_id(1) % ngroups
    ch = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = ch < per_group
    d = (g * per_group + ch).to(tl.int64)
    n = tl.arange(0, DSTATE)
    mask_n = n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dim = ngroups * per_group

    A_rows = A_ptr + d[:, None] * s_A_d + n[None, :] * s_A_n
    A_re2 = tl.load(A_rows, mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    A_im = tl.load(A_rows + s_A_c, mask=mask_dn, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0) if HAS_BIAS else None
    skip = tl.load(D_ptr + d, mask=mask_d, other=0.0) if HAS_D else None
    # The states, (batch, dim, dstate, 2): real and imaginary parts adjacent.
    state_offs = ((b * dim + d)[:, None] * dstate + n[None, :]) * 2
    if HAS_H0:
        h_re = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0)
        h_im = tl.load(h0_ptr + state_offs + 1, mask=mask_dn, other=0.0)
    else:
        h_re = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
        h_im = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)

    u_row = u_ptr + b * s_u_b + d[:, None] * s_u_d
    dt_row = delta_ptr + b * s_dt_b + d[:, None] * s_dt_d
    z_row = z_ptr + b * s_z_b + d[:, None] * s_z_d
    out_row = (b * dim + d)[:, None] * seqlen
    ckpt = ckpt_ptr + ((b * dim + d)[:, None] * nchunks * dstate + n[None, :]) * 2
    local = tl.arange(0, CHUNK)
    last_step = local[None, None, :] == CHUNK - 1

    for c in range(0, nchunks):
        if SAVE_CKPT:
            tl.store(ckpt + c * dstate * 2, h_re, mask=mask_dn)
            tl.store(ckpt + c * dstate * 2 + 1, h_im, mask=mask_dn)
        t = c * CHUNK + local
        mask_t = t < seqlen
        mask = mask_d[:, None] & mask_t[None, :]
        mask_nt = mask_n[:, None] & mask_t[None, :]
        u = tl.load(u_row + t[None, :] * s_u_l, mask=mask, other=0.0).to(tl.float32)
        _, step = _load_delta(dt_row + t[None, :] * s_dt_l, mask, bias, HAS_BIAS, SOFTPLUS)
        B_re, B_im = _load_projection_complex(
            B_ptr, b, g, d, n, t, mask_dn, mask_nt, s_B_b, s_B_g, s_B_d, s_B_n, s_B_l, s_B_c, VAR_B
        )
        C_re, C_im = _load_projection_complex(
            C_ptr, b, g, d, n, t, mask_dn, mask_nt, s_C_b, s_C_g, s_C_d, s_C_n, s_C_l, s_C_c, VAR_C
        )
        states_re, states_im, _, _, _, _ = _complex_chunk(step, u, A_re2, A_im, B_re, B_im, h_re, h_im)
        y = 2.0 * tl.sum(C_re * states_re - C_im * states_im, axis=1)
        if HAS_D:
            y += skip[:, None] * u
        if HAS_Z:
            zt = tl.load(z_row + t[None, :] * s_z_l, mask=mask, other=0.0).to(tl.float32)
            y *= zt * tl.sigmoid(zt)
        tl.store(y_ptr + out_row + t[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        # Δ = 0 past seqlen leaves the state as it is: the chunk's last state is the sequence's.
        h_re = tl.sum(tl.where(last_step, states_re, 0.0), axis=2)
        h_im = tl.sum(tl.where(last_step, states_im, 0.0), axis=2)

    tl.store(last_ptr + state_offs, h_re, mask=mask_dn)
    tl.store(last_ptr + state_offs + 1, h_im, mask=mask_dn)


@triton.jit
def _bwd_kernel_complex(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dy_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    ngroups, per_group, seqlen, dstate, nchunks,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_z_b, s_z_d, s_z_l,
    s_dy_b, s_dy_d, s_dy_l,
    s_A_d, s_A_n, s_A_c,
    s_B_b, s_B_g, s_B_d, s_B_n, s_B_l, s_B_c,
    s_C_b, s_C_g, s_C_d, s_C_n, s_C_l, s_C_c,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr,
    SOFTPLUS: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
    DSTATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # The real backward's walk with complex numbers. With g = dL/dRe + i dL/dIm
    # (PyTorch's complex gradient), g_h = 2 dy conj(C) + conj(a_{t+1}) g_{h, t+1}
    # (y = 2 Re(C·h)), and with x = a h_{t-1}: dC += 2 dy conj(h), dB += Δ u g_h,
    # dA += Δ conj(x) g_h, dΔ = Re(g_h conj(A x)) + u Re(g_h conj(B)).
    b = tl.program_id(1) // ngroups
    g = tl.program_id(1) % ngroups
    ch = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = ch < per_group
    d = (g * per_group + ch).to(tl.int64)
    n = tl.arange(0, DSTATE)
    mask_n = n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dim = ngroups * per_group

    A_rows = A_ptr + d[:, None] * s_A_d + n[None, :] * s_A_n
    A_re = tl.load(A_rows, mask=mask_dn, other=0.0).to(tl.float32)
    A_im = tl.load(A_rows + s_A_c, mask=mask_dn, other=0.0).to(tl.float32)
    A_re2 = A_re * LOG2E
    bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0) if HAS_BIAS else None
    skip = tl.load(D_ptr + d, mask=mask_d, other=0.0) if HAS_D else None
    state_offs = ((b * dim + d)[:, None] * dstate + n[None, :]) * 2
    if HAS_DLAST:
        carry_re = tl.load(dlast_ptr + state_offs, mask=mask_dn, other=0.0)
        carry_im = tl.load(dlast_ptr + state_offs + 1, mask=mask_dn, other=0.0)
    else:
        carry_re = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
        carry_im = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
    dA_re = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
    dA_im = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
    dB_fixed_re = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
    dB_fixed_im = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
    dC_fixed_re = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
    dC_fixed_im = tl.zeros((BLOCK_D, DSTATE), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)

    u_row = u_ptr + b * s_u_b + d[:, None] * s_u_d
    dt_row = delta_ptr + b * s_dt_b + d[:, None] * s_dt_d
    z_row = z_ptr + b * s_z_b + d[:, None] * s_z_d
    dy_row = dy_ptr + b * s_dy_b + d[:, None] * s_dy_d
    out_row = (b * dim + d)[:, None] * seqlen
    # A time-varying dB or dC: (batch, ngroups, dstate, 2 * seqlen), pairs along the last axis as B's.
    dBC_rows = ((b * ngroups + g) * dstate + n)[:, None] * (2 * seqlen)
    ckpt = ckpt_ptr + ((b * dim + d)[:, None] * nchunks * dstate + n[None, :]) * 2
    local = tl.arange(0, CHUNK)
    first_step = local[None, None, :] == 0

    for i in range(0, nchunks):
        c = nchunks - 1 - i
        t = c * CHUNK + local
        mask_t = t < seqlen
        mask = mask_d[:, None] & mask_t[None, :]
        mask_nt = mask_n[:, None] & mask_t[None, :]

        h0_re = tl.load(ckpt + c * dstate * 2, mask=mask_dn, other=0.0)
        h0_im = tl.load(ckpt + c * dstate * 2 + 1, mask=mask_dn, other=0.0)
        u = tl.load(u_row + t[None, :] * s_u_l, mask=mask, other=0.0).to(tl.float32)
        pre, step = _load_delta(dt_row + t[None, :] * s_dt_l, mask, bias, HAS_BIAS, SOFTPLUS)
        B_re, B_im = _load_projection_complex(
            B_ptr, b, g, d, n, t, mask_dn, mask_nt, s_B_b, s_B_g, s_B_d, s_B_n, s_B_l, s_B_c, VAR_B
        )
        C_re, C_im = _load_projection_complex(
            C_ptr, b, g, d, n, t, mask_dn, mask_nt, s_C_b, s_C_g, s_C_d, s_C_n, s_C_l, s_C_c, VAR_C
        )
        states_re, states_im, decay_re, decay_im, drive_re, drive_im = _complex_chunk(
            step, u, A_re2, A_im, B_re, B_im, h0_re, h0_im
        )

        dy = tl.load(dy_row + t[None, :] * s_dy_l, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_row + t[None, :] * s_z_l, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zt)
            y = 2.0 * tl.sum(C_re * states_re - C_im * states_im, axis=1)
            if HAS_D:
                y += skip[:, None] * u
            dz = dy * y * sig * (1.0 + zt * (1.0 - sig))
            tl.store(dz_ptr + out_row + t[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
            dy = dy * zt * sig
        du = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)
        if HAS_D:
            dD += tl.sum(dy * u, axis=1)
            du += skip[:, None] * dy

        # The adjoint recurrence as a reverse scan, with conj(a_{t+1}) as its decay (1 at the chunk's end).
        next_t = t + 1
        mask_next = mask_d[:, None] & ((local < CHUNK - 1) & (next_t < seqlen))[None, :]
        _, next_step = _load_delta(dt_row + next_t[None, :] * s_dt_l, mask_next, bias, HAS_BIAS, SOFTPLUS)
        next_re, next_im = _complex_decay(next_step, A_re2, A_im)
        dy2 = 2.0 * dy[:, None, :]
        through_re, through_im, grad_re, grad_im = tl.associative_scan(
            (next_re, -next_im, dy2 * C_re, -dy2 * C_im), axis=2, combine_fn=_compose_complex, reverse=True
        )
        grad_re += through_re * carry_re[:, :, None] - through_im * carry_im[:, :, None]
        grad_im += through_re * carry_im[:, :, None] + through_im * carry_re[:, :, None]
        # conj(a_t0) g_t0: the gradient of the state entering the chunk.
        carry_re = tl.sum(tl.where(first_step, decay_re * grad_re + decay_im * grad_im, 0.0), axis=2)
        carry_im = tl.sum(tl.where(first_step, decay_re * grad_im - decay_im * grad_re, 0.0), axis=2)

        # Drive Δ u B.
        grad_B = tl.sum(grad_re * B_re + grad_im * B_im, axis=1)
        du += step * grad_B
        dstep = u * grad_B
        # Decay: x = a h_{t-1} = h_t - drive, and A x.
        x_re = states_re - drive_re
        x_im = states_im - drive_im
        Ax_re = A_re[:, :, None] * x_re - A_im[:, :, None] * x_im
        Ax_im = A_re[:, :, None] * x_im + A_im[:, :, None] * x_re
        dstep += tl.sum(grad_re * Ax_re + grad_im * Ax_im, axis=1)
        dA_re += tl.sum(step[:, None, :] * (x_re * grad_re + x_im * grad_im), axis=2)
        dA_im += tl.sum(step[:, None, :] * (x_re * grad_im - x_im * grad_re), axis=2)
        if SOFTPLUS:
            dstep *= tl.sigmoid(pre)
        dstep = tl.where(mask, dstep, 0.0)
        dbias += tl.sum(dstep, axis=1)

        step_u = (step * u)[:, None, :]
        if VAR_B:
            pairs = dB_ptr + dBC_rows + 2 * t[None, :]
            tl.atomic_add(pairs, tl.sum(grad_re * step_u, axis=0), mask=mask_nt, sem="relaxed")
            tl.atomic_add(pairs + 1, tl.sum(grad_im * step_u, axis=0), mask=mask_nt, sem="relaxed")
        else:
            dB_fixed_re += tl.sum(grad_re * step_u, axis=2)
            dB_fixed_im += tl.sum(grad_im * step_u, axis=2)
        if VAR_C:
            pairs = dC_ptr + dBC_rows + 2 * t[None, :]
            tl.atomic_add(pairs, tl.sum(dy2 * states_re, axis=0), mask=mask_nt, sem="relaxed")
            tl.atomic_add(pairs + 1, -tl.sum(dy2 * states_im, axis=0), mask=mask_nt, sem="relaxed")
        else:
            dC_fixed_re += tl.sum(dy2 * states_re, axis=2)
            dC_fixed_im -= tl.sum(dy2 * states_im, axis=2)
        tl.store(du_ptr + out_row + t[None, :], du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + out_row + t[None, :], dstep.to(ddelta_ptr.dtype.element_ty), mask=mask)

    # Per batch row, (batch, dim, dstate, 2) for the complex ones: torch sums the batch.
    tl.store(dh0_ptr + state_offs, carry_re, mask=mask_dn)
    tl.store(dh0_ptr + state_offs + 1, carry_im, mask=mask_dn)
    tl.store(dA_ptr + state_offs, dA_re, mask=mask_dn)
    tl.store(dA_ptr + state_offs + 1, dA_im, mask=mask_dn)
    if not VAR_B:
        tl.store(dB_ptr + state_offs, dB_fixed_re, mask=mask_dn)
        tl.store(dB_ptr + state_offs + 1, dB_fixed_im, mask=mask_dn)
    if not VAR_C:
        tl.store(dC_ptr + state_offs, dC_fixed_re, mask=mask_dn)
        tl.store(dC_ptr + state_offs + 1, dC_fixed_im, mask=mask_dn)
    tl.store(dD_ptr + b * dim + d, dD, mask=mask_d)
    tl.store(dbias_ptr + b * dim + d, dbias, mask=mask_d)


def _kernel_form(t: torch.Tensor) -> torch.Tensor:
    """B or C as the kernels read it: a time-varying one as (batch, ngroups, dstate, steps) (ungrouped is one
    group); a time-invariant one as (dim, dstate), or its (dim, dstate, 2) real view when complex."""
    if t.ndim == 2:
        return torch.view_as_real(t.to(torch.complex64)) if t.is_complex() else t
    return t if t.ndim == 4 else t.unsqueeze(1)


def _ngroups(B: torch.Tensor, C: torch.Tensor) -> int:
    """The groups of the time-varying ones among B and C (in kernel form); 1 when both are time-invariant."""
    return B.shape[1] if B.ndim == 4 else (C.shape[1] if C.ndim == 4 else 1)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    # A size-1 dimension is never stepped along; a zero stride keeps offsets small.
    return tuple(s if n > 1 else 0 for s, n in zip(t.stride(), t.shape))


def _bc_strides(t: torch.Tensor) -> tuple[int, ...]:
    """(batch, group, dim, dstate, seqlen) strides of B or C: only a time-invariant one steps along dim."""
    if t.ndim == 2:
        return (0, 0, *t.stride(), 0)
    s_b, s_g, s_n, s_l = _strides(t)
    return (s_b, s_g, 0, s_n, s_l)


def _bc_strides_complex(t: torch.Tensor) -> tuple[int, ...]:
    """(batch, group, dim, dstate, step, real -> imaginary) strides of B or C beside complex A."""
    if t.ndim == 3:  # time-invariant: the (dim, dstate, 2) real view
        s_d, s_n, s_c = t.stride()
        return (0, 0, s_d, s_n, 0, s_c)
    s_b, s_g, s_n, s_l = _strides(t)  # time-varying: step t's pair at 2t, 2t + 1
    return (s_b, s_g, 0, s_n, 2 * s_l, s_l)


def _fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    delta_softplus: bool,
    save_checkpoints: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, last_state, checkpoints): checkpoints are the states entering each chunk, or empty.

    B and C in kernel form; complex A comes as its (dim, dstate, 2) real view, and
    then the states (initial_state, last_state, checkpoints) are (..., dstate, 2) too.
    """
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    state = A.shape[1:]
    ngroups = _ngroups(B, C)
    nchunks = triton.cdiv(seqlen, CHUNK)
    y = u.new_empty(batch, dim, seqlen)
    last = u.new_empty(batch, dim, *state, dtype=torch.float32)
    checkpoints = u.new_empty(batch, dim, nchunks if save_checkpoints else 0, *state, dtype=torch.float32)
    # Absent optional tensors are never read (their HAS_* flag is off); u stands in for them.
    common = (
        u, delta, A, B, C,
        u if D is None else D,
        u if z is None else z,
        u if delta_bias is None else delta_bias,
        u if initial_state is None else initial_state,
        y, last, checkpoints if save_checkpoints else last,
        ngroups, dim // ngroups, seqlen, dstate, nchunks,
        *_strides(u), *_strides(delta), *(_strides(z) if z is not None else (0, 0, 0)),
    )
    flags = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=initial_state is not None, SOFTPLUS=delta_softplus, SAVE_CKPT=save_checkpoints,
        VAR_B=B.ndim == 4, VAR_C=C.ndim == 4, DSTATE=triton.next_power_of_2(dstate), CHUNK=CHUNK,
    )
    if A.ndim == 3:
        grid = (triton.cdiv(dim // ngroups, CPLX_FWD_BLOCK_D), batch * ngroups)
        _wrap(_fwd_kernel_complex)[grid](
            *common, *A.stride(), *_bc_strides_complex(B), *_bc_strides_complex(C),
            **flags, BLOCK_D=CPLX_FWD_BLOCK_D, num_warps=CPLX_NUM_WARPS,
        )
        return y, last, checkpoints

    def grid(meta):
        return (triton.cdiv(dim // ngroups, meta["BLOCK_D"]), batch * ngroups)

    _wrap(_fwd_kernel)[grid](
        *common, *_strides(A), *_bc_strides(B), *_bc_strides(C), **flags, NSTATE=dstate, TILE=FWD_TILE,
    )
    return y, last, checkpoints


def _bwd(
    dy: torch.Tensor,
    dlast: torch.Tensor | None,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    checkpoints: torch.Tensor,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """(du, ddelta, dz, dB, dC, dA, dD, ddelta_bias, dinitial_state) in fp32 except du, ddelta, dz.

    Inputs as _fwd takes them; dz is empty without z; dB and dC are shaped like B
    and C, and dA, dinitial_state like A and the states.
    """
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    state = A.shape[1:]
    ngroups = _ngroups(B, C)
    nchunks = checkpoints.shape[2]
    f32 = torch.float32
    du = u.new_empty(batch, dim, seqlen)
    ddelta = delta.new_empty(batch, dim, seqlen)
    dz = u.new_empty(batch, dim, seqlen) if z is not None else u.new_empty(0)

    def projection_grad(t):
        # Time-varying: atomics add into it. Time-invariant: one per batch row, summed below.
        if t.ndim == 4:
            return u.new_zeros(t.shape, dtype=f32)
        return u.new_empty(batch, *t.shape, dtype=f32)

    dB, dC = projection_grad(B), projection_grad(C)
    dA = u.new_empty(batch, *A.shape, dtype=f32)
    dD = u.new_empty(batch, dim, dtype=f32)
    dbias = u.new_empty(batch, dim, dtype=f32)
    dh0 = u.new_empty(batch, dim, *state, dtype=f32)
    common = (
        u, delta, A, B, C,
        u if D is None else D,
        u if z is None else z,
        u if delta_bias is None else delta_bias,
        checkpoints, dy,
        dh0 if dlast is None else dlast,
        du, ddelta, dz if z is not None else du, dB, dC, dA, dD, dbias, dh0,
        ngroups, dim // ngroups, seqlen, dstate, nchunks,
        *_strides(u), *_strides(delta), *(_strides(z) if z is not None else (0, 0, 0)), *_strides(dy),
    )
    flags = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_DLAST=dlast is not None,
        SOFTPLUS=delta_softplus, VAR_B=B.ndim == 4, VAR_C=C.ndim == 4,
        DSTATE=triton.next_power_of_2(dstate), CHUNK=CHUNK,
    )
    if A.ndim == 3:
        grid = (triton.cdiv(dim // ngroups, CPLX_BWD_BLOCK_D), batch * ngroups)
        _wrap(_bwd_kernel_complex)[grid](
            *common, *A.stride(), *_bc_strides_complex(B), *_bc_strides_complex(C),
            **flags, BLOCK_D=CPLX_BWD_BLOCK_D, num_warps=CPLX_NUM_WARPS,
        )
    else:
        grid = (triton.cdiv(dim // ngroups, BWD_BLOCK_D), batch * ngroups)
        _wrap(_bwd_kernel)[grid](
            *common, *_strides(A), *_bc_strides(B), *_bc_strides(C),
            **flags, BLOCK_D=BWD_BLOCK_D, num_warps=BWD_NUM_WARPS,
        )
    dB = dB if B.ndim == 4 else dB.sum(0)
    dC = dC if C.ndim == 4 else dC.sum(0)
    return du, ddelta, dz, dB, dC, dA.sum(0), dD.sum(0), dbias.sum(0), dh0


def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save_checkpoints):
    batch, dim, seqlen = u.shape
    nchunks = triton.cdiv(seqlen, CHUNK) if save_checkpoints else 0
    return (
        u.new_empty(batch, dim, seqlen),
        u.new_empty(batch, dim, *A.shape[1:], dtype=torch.float32),
        u.new_empty(batch, dim, nchunks, *A.shape[1:], dtype=torch.float32),
    )


def _bwd_fake(dy, dlast, u, delta, A, B, C, D, z, delta_bias, checkpoints, delta_softplus):
    batch, dim, seqlen = u.shape
    f32 = torch.float32
    return (
        u.new_empty(batch, dim, seqlen),
        delta.new_empty(batch, dim, seqlen),
        u.new_empty(batch, dim, seqlen) if z is not None else u.new_empty(0),
        u.new_empty(B.shape, dtype=f32),
        u.new_empty(C.shape, dtype=f32),
        u.new_empty(A.shape, dtype=f32),
        u.new_empty(dim, dtype=f32),
        u.new_empty(dim, dtype=f32),
        u.new_empty(batch, dim, *A.shape[1:], dtype=f32),
    )


# In the lnlm_ssm namespace, beside the C++ ops, where they were first registered.
_fwd_op = _library_op("selective_scan_triton_fwd", _fwd, (), _fwd_fake, namespace="lnlm_ssm")
_bwd_op = _library_op("selective_scan_triton_bwd", _bwd, (), _bwd_fake, namespace="lnlm_ssm")


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _state(t: torch.Tensor | None) -> torch.Tensor | None:
    """An initial state as the kernels read it: fp32, or the (..., dstate, 2) real view of a complex64 one."""
    if t is None or not t.is_complex():
        return _fp32(t)
    return torch.view_as_real(t.to(torch.complex64)).contiguous()


class _SelectiveScan(torch.autograd.Function):
    """(y, last_state) for inputs in kernel form; the gradients come back in that form."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        save = any(ctx.needs_input_grad)
        y, last, checkpoints = _fwd_op(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, save)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints)
            ctx.delta_softplus = delta_softplus
            ctx.has_initial_state = initial_state is not None
        # Without a gradient for y or for the last state, backward gets None
        # for it instead of a tensor of zeros to read.
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, D, z, delta_bias, checkpoints = ctx.saved_tensors
        du, ddelta, dz, dB, dC, dA, dD, dbias, dh0 = _bwd_op(
            torch.zeros_like(u) if dy is None else dy,
            None if dlast is None else dlast.contiguous(),
            u, delta, A, B, C, D, z, delta_bias, checkpoints, ctx.delta_softplus,
        )
        return (
            du,
            ddelta,
            dA.to(A.dtype),
            dB.to(B.dtype),
            dC.to(C.dtype),
            None if D is None else dD,
            None if z is None else dz,
            None if delta_bias is None else dbias,
            dh0 if ctx.has_initial_state else None,
            None,
        )


def selective_scan_triton(
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
    refuse_float64("selective_scan_fn", "u", u)
    # The per-channel parameters and the state are read as fp32 (complex64 through
    # real views); autograd takes the gradients back through the casts and views.
    complex_A = A.is_complex()
    out, last_state = _SelectiveScan.apply(
        u,
        delta,
        torch.view_as_real(A.to(torch.complex64)) if complex_A else A,
        _kernel_form(B),
        _kernel_form(C),
        _fp32(D),
        z,
        _fp32(delta_bias),
        _state(initial_state),
        bool(delta_softplus),
    )
    if not return_last_state:
        return out
    return out, (torch.view_as_complex(last_state) if complex_A else last_state)
