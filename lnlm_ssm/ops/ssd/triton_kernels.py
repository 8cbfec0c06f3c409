"""Triton kernels of the Mamba-2 SSD chunked scan (launched from ``triton.py``).

Layouts (b batch, l seqlen, h heads, g groups, p headdim, n dstate, c chunks,
T chunk_size). User tensors keep their strides: x, dy, dx (b, l, h, p); dt
(b, l, h); B, C (b, l, g, n); seq_idx (b, l). Intermediates are contiguous
fp32: dt and the within-chunk cumsum of dt*A, ``cs`` (b, h, c, T); C B^T per
group (b, c, g, T, T); states (b, c, h, p, n).

Every decay is exp(cs_t - cs_s) with the exponent replaced by -inf wherever the
pair is masked (s > t, other sequence, padding) *before* exp: a large masked
difference would otherwise overflow to inf and turn 0 * inf into NaN.

seq_idx: the state entering chunk c belongs to the sequence of the token just
before the chunk (of token 0 for c = 0, as initial_states do); it reaches the
tokens of that sequence only, and survives the chunk only if the chunk's last
token is of it. Base offsets are int64 so that long sequences do not wrap.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lnlm_ssm.ops import _triton  # noqa: F401  (lets Triton 3.6's interpreter run our loops)


# Matmul modes (MODE): in fp32 (fp32 or mixed-dtype inputs; tf32 would miss fp32's
# tolerance by far), on the inputs' half-precision tensor cores, or the same
# half-precision values multiplied in fp32 (exact products, as tensor cores give):
# the interpreter's bf16 tl.dot is wrong.
DOT_FP32, DOT_LOWP, DOT_LOWP_VIA_FP32 = 0, 1, 2


@triton.jit
def _lowp_dot(a, b, acc, MODE: tl.constexpr):
    if MODE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _mm(a, b, acc, like_ptr, MODE: tl.constexpr, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr):
    """acc + a @ b. In half precision an operand computed in fp32 (a decay-weighted matrix, a
    state) is split into high and low half-precision parts, so the product keeps about twice
    the half's mantissa: rounding it once would cost more than the inputs' own rounding.
    Operands that are inputs as given (``*_EXACT``) are representable and need no low part."""
    if MODE == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    ty = like_ptr.dtype.element_ty
    a_hi = a.to(ty)
    b_hi = b.to(ty)
    acc = _lowp_dot(a_hi, b_hi, acc, MODE)
    if not A_EXACT:
        acc = _lowp_dot((a.to(tl.float32) - a_hi.to(tl.float32)).to(ty), b_hi, acc, MODE)
    if not B_EXACT:
        acc = _lowp_dot(a_hi, (b.to(tl.float32) - b_hi.to(tl.float32)).to(ty), acc, MODE)
    return acc


@triton.jit
def _decay(keep, log_decay):
    return tl.exp(tl.where(keep, log_decay, float("-inf")))


@triton.jit
def _seq_at(seq_ptr, b, pos, s_seq_b, s_seq_l):
    return tl.load(seq_ptr + b.to(tl.int64) * s_seq_b + pos * s_seq_l)


@triton.jit
def _discretise(raw, dt_min, dt_max, SOFTPLUS: tl.constexpr):
    if SOFTPLUS:
        # torch's softplus threshold: above 20 it is the identity.
        raw = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))
    return tl.minimum(tl.maximum(raw, dt_min), dt_max)


@triton.jit
def chunk_cumsum_fwd_kernel(
    dt_ptr, A_ptr, bias_ptr, dt_out_ptr, cs_ptr,
    seqlen, nheads, nchunks, chunk_size, s_dt_b, s_dt_l, s_dt_h, dt_min, dt_max,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b, c = tl.program_id(0), tl.program_id(1)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = tl.arange(0, BLOCK_T)
    pos = c * chunk_size + t
    in_chunk = t < chunk_size
    mask = (in_chunk & (pos < seqlen))[:, None] & (h < nheads)[None, :]
    raw = tl.load(
        dt_ptr + b.to(tl.int64) * s_dt_b + pos.to(tl.int64)[:, None] * s_dt_l + h[None, :] * s_dt_h,
        mask=mask, other=0.0,
    ).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + h, mask=h < nheads, other=0.0).to(tl.float32)[None, :]
    # Padding steps get dt = 0: they leave the state alone.
    dt = tl.where(mask, _discretise(raw, dt_min, dt_max, SOFTPLUS), 0.0)
    A = tl.load(A_ptr + h, mask=h < nheads, other=0.0).to(tl.float32)
    cs = tl.cumsum(dt * A[None, :], axis=0)
    off = ((b * nheads + h[None, :]).to(tl.int64) * nchunks + c) * chunk_size + t[:, None]
    smask = in_chunk[:, None] & (h < nheads)[None, :]
    tl.store(dt_out_ptr + off, dt, mask=smask)
    tl.store(cs_ptr + off, cs, mask=smask)


@triton.jit
def chunk_cumsum_bwd_kernel(
    dt_ptr, A_ptr, bias_ptr, dt_out_ptr, dcs_ptr, dlast_ptr, ddt_direct_ptr, ddt_ptr, dA_ptr, dbias_ptr,
    seqlen, nheads, nchunks, chunk_size, s_dt_b, s_dt_l, s_dt_h, dt_min, dt_max,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dcs (gradient of each cumsum entry) -> d(dt*A) by a reverse cumsum -> dt, A, dt_bias."""
    b, c = tl.program_id(0), tl.program_id(1)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = tl.arange(0, BLOCK_T)
    pos = c * chunk_size + t
    in_chunk = t < chunk_size
    hmask = h < nheads
    mask = (in_chunk & (pos < seqlen))[:, None] & hmask[None, :]
    off = ((b * nheads + h[None, :]).to(tl.int64) * nchunks + c) * chunk_size + t[:, None]
    imask = in_chunk[:, None] & hmask[None, :]
    dcs = tl.load(dcs_ptr + off, mask=imask, other=0.0)
    # The chunk's last cumsum entry also feeds its state's decay.
    dlast = tl.load(dlast_ptr + (b * nheads + h).to(tl.int64) * nchunks + c, mask=hmask, other=0.0)
    dcs += tl.where(t == chunk_size - 1, 1.0, 0.0)[:, None] * dlast[None, :]
    da = tl.cumsum(dcs, axis=0, reverse=True)
    dt = tl.load(dt_out_ptr + off, mask=imask, other=0.0)
    A = tl.load(A_ptr + h, mask=hmask, other=0.0).to(tl.float32)
    ddt = tl.load(ddt_direct_ptr + off, mask=imask, other=0.0) + da * A[None, :]
    part = (b * nchunks + c).to(tl.int64) * nheads + h
    tl.store(dA_ptr + part, tl.sum(tl.where(mask, da * dt, 0.0), axis=0), mask=hmask)

    ptr = b.to(tl.int64) * s_dt_b + pos.to(tl.int64)[:, None] * s_dt_l + h[None, :] * s_dt_h
    raw = tl.load(dt_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + h, mask=hmask, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        soft = tl.where(raw > 20.0, raw, tl.log(1.0 + tl.exp(raw)))
    else:
        soft = raw
    # torch.clamp passes the gradient where min <= value <= max.
    ddt = tl.where((soft >= dt_min) & (soft <= dt_max) & mask, ddt, 0.0)
    if SOFTPLUS:
        ddt *= tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
    tl.store(ddt_ptr + ptr, ddt, mask=mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + part, tl.sum(ddt, axis=0), mask=hmask)


@triton.jit
def bmm_cb_kernel(
    C_ptr, B_ptr, cb_ptr,
    seqlen, ngroups, nchunks, chunk_size, dstate,
    s_b_b, s_b_l, s_b_g, s_b_n, s_c_b, s_c_l, s_c_g, s_c_n,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """cb[b, c, g, t, s] = C_t . B_s for s <= t (blocks above the diagonal are never read)."""
    pid = tl.program_id(0)
    g = pid % ngroups
    c = (pid // ngroups) % nchunks
    b = pid // (ngroups * nchunks)
    pid_m, pid_n = tl.program_id(1), tl.program_id(2)
    if pid_n * BLOCK_N >= (pid_m + 1) * BLOCK_M:
        return
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    s = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mt = (t < chunk_size) & (c * chunk_size + t < seqlen)
    ms = (s < chunk_size) & (c * chunk_size + s < seqlen)
    C_base = C_ptr + b.to(tl.int64) * s_c_b + g * s_c_g + (c * chunk_size + t).to(tl.int64)[:, None] * s_c_l
    B_base = B_ptr + b.to(tl.int64) * s_b_b + g * s_b_g + (c * chunk_size + s).to(tl.int64)[None, :] * s_b_l
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, dstate, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        Ct = tl.load(C_base + k[None, :] * s_c_n, mask=mt[:, None] & (k < dstate)[None, :], other=0.0)
        Bs = tl.load(B_base + k[:, None] * s_b_n, mask=(k < dstate)[:, None] & ms[None, :], other=0.0)
        acc = _mm(Ct, Bs, acc, C_ptr, MODE, True, True)
    off = (((b * nchunks + c) * ngroups + g).to(tl.int64) * chunk_size + t[:, None]) * chunk_size + s[None, :]
    tl.store(cb_ptr + off, acc, mask=(t < chunk_size)[:, None] & (s < chunk_size)[None, :])


@triton.jit
def chunk_state_kernel(
    x_ptr, y_ptr, dt_ptr, cs_ptr, seq_ptr, out_ptr,
    seqlen, nheads, ngroups, nchunks, chunk_size, headdim, dstate,
    s_x_b, s_x_l, s_x_h, s_x_p, s_y_b, s_y_l, s_y_g, s_y_n, s_seq_b, s_seq_l,
    FROM_START: tl.constexpr, HAS_SEQ: tl.constexpr, MODE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[b, c, h] = sum_s w_s x_s^T y_s over the chunk, (p, n).

    Forward (x, y = B): w_s = exp(cs_last - cs_s) dt_s, tokens of the last token's sequence:
    the chunk's own contribution to the state at its end.
    Backward (x = dy, y = C, FROM_START): w_s = exp(cs_s), tokens the entering state reaches:
    the gradient of the state entering the chunk, from this chunk's outputs.
    """
    pid = tl.program_id(0)
    h = pid % nheads
    c = (pid // nheads) % nchunks
    b = pid // (nheads * nchunks)
    g = h // (nheads // ngroups)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    cs_base = ((b * nheads + h).to(tl.int64) * nchunks + c) * chunk_size
    start = c * chunk_size
    cs_last = tl.load(cs_ptr + cs_base + chunk_size - 1)
    if HAS_SEQ:
        if FROM_START:
            ref_seq = _seq_at(seq_ptr, b, tl.maximum(start - 1, 0), s_seq_b, s_seq_l)
        else:
            ref_seq = _seq_at(seq_ptr, b, tl.minimum(start + chunk_size, seqlen) - 1, s_seq_b, s_seq_l)
    x_base = x_ptr + b.to(tl.int64) * s_x_b + h * s_x_h + p[:, None] * s_x_p
    y_base = y_ptr + b.to(tl.int64) * s_y_b + g * s_y_g + n[None, :] * s_y_n
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, chunk_size, BLOCK_K):
        s = k0 + tl.arange(0, BLOCK_K)
        pos = (start + s).to(tl.int64)
        ms = (s < chunk_size) & (start + s < seqlen)
        xs = tl.load(x_base + pos[None, :] * s_x_l, mask=(p < headdim)[:, None] & ms[None, :], other=0.0)
        ys = tl.load(y_base + pos[:, None] * s_y_l, mask=ms[:, None] & (n < dstate)[None, :], other=0.0)
        cs_s = tl.load(cs_ptr + cs_base + s, mask=s < chunk_size, other=0.0)
        keep = ms
        if HAS_SEQ:
            keep &= tl.load(seq_ptr + b.to(tl.int64) * s_seq_b + pos * s_seq_l, mask=ms, other=-1) == ref_seq
        if FROM_START:
            w = _decay(keep, cs_s)
        else:
            w = _decay(keep, cs_last - cs_s) * tl.load(dt_ptr + cs_base + s, mask=s < chunk_size, other=0.0)
        acc = _mm(xs * w[None, :], ys, acc, y_ptr, MODE, False, True)
    off = (((b * nchunks + c) * nheads + h).to(tl.int64) * headdim + p[:, None]) * dstate + n[None, :]
    tl.store(out_ptr + off, acc, mask=(p < headdim)[:, None] & (n < dstate)[None, :])


@triton.jit
def state_passing_fwd_kernel(
    states_ptr, init_ptr, cs_ptr, seq_ptr, final_ptr,
    seqlen, nheads, nchunks, chunk_size, dim, s_seq_b, s_seq_l,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):
    """In place: states[b, c, h] holds chunk c's own state on entry, the state entering chunk c on exit."""
    b, h = tl.program_id(0), tl.program_id(1)
    e = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    me = e < dim
    if HAS_INIT:
        state = tl.load(init_ptr + (b * nheads + h).to(tl.int64) * dim + e, mask=me, other=0.0)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_SEQ:
        state_seq = _seq_at(seq_ptr, b, 0, s_seq_b, s_seq_l)
    for c in range(0, nchunks):
        off = ((b * nchunks + c) * nheads + h).to(tl.int64) * dim + e
        own = tl.load(states_ptr + off, mask=me, other=0.0)
        tl.store(states_ptr + off, state, mask=me)
        decay = tl.exp(tl.load(cs_ptr + ((b * nheads + h).to(tl.int64) * nchunks + c) * chunk_size + chunk_size - 1))
        if HAS_SEQ:
            last_seq = _seq_at(seq_ptr, b, tl.minimum((c + 1) * chunk_size, seqlen) - 1, s_seq_b, s_seq_l)
            decay = tl.where(last_seq == state_seq, decay, 0.0)
            state_seq = last_seq
        state = state * decay + own
    tl.store(final_ptr + (b * nheads + h).to(tl.int64) * dim + e, state, mask=me)


@triton.jit
def state_passing_bwd_kernel(
    states_ptr, dstates_ptr, dfinal_ptr, cs_ptr, seq_ptr, dinit_ptr, dlast_ptr,
    seqlen, nheads, nchunks, chunk_size, dim, s_seq_b, s_seq_l,
    HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK: tl.constexpr,
):
    """In place: dstates[b, c, h] holds d(state entering c) from c's outputs on entry, the total
    gradient of the state leaving chunk c on exit. dlast gets d(cs_last) of each chunk's decay
    (one partial sum per program)."""
    b, h, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    me = e < dim
    if HAS_DFINAL:
        grad = tl.load(dfinal_ptr + (b * nheads + h).to(tl.int64) * dim + e, mask=me, other=0.0)
    else:
        grad = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, nchunks):
        c = nchunks - 1 - i
        off = ((b * nchunks + c) * nheads + h).to(tl.int64) * dim + e
        local = tl.load(dstates_ptr + off, mask=me, other=0.0)
        tl.store(dstates_ptr + off, grad, mask=me)
        cs_off = ((b * nheads + h).to(tl.int64) * nchunks + c) * chunk_size + chunk_size - 1
        decay = tl.exp(tl.load(cs_ptr + cs_off))
        if HAS_SEQ:
            last_seq = _seq_at(seq_ptr, b, tl.minimum((c + 1) * chunk_size, seqlen) - 1, s_seq_b, s_seq_l)
            entering_seq = _seq_at(seq_ptr, b, tl.maximum(c * chunk_size - 1, 0), s_seq_b, s_seq_l)
            decay = tl.where(last_seq == entering_seq, decay, 0.0)
        entering = tl.load(states_ptr + off, mask=me, other=0.0)
        tl.store(dlast_ptr + ((b * nheads + h) * nchunks + c).to(tl.int64) * tl.num_programs(2) + pid,
                 tl.sum(grad * entering, axis=0) * decay)
        grad = local + grad * decay
    tl.store(dinit_ptr + (b * nheads + h).to(tl.int64) * dim + e, grad, mask=me)


@triton.jit
def chunk_scan_fwd_kernel(
    cb_ptr, x_ptr, z_ptr, dt_ptr, cs_ptr, C_ptr, states_ptr, D_ptr, seq_ptr, out_ptr, out_x_ptr,
    seqlen, nheads, ngroups, nchunks, chunk_size, headdim, dstate,
    s_x_b, s_x_l, s_x_h, s_x_p, s_z_b, s_z_l, s_z_h, s_z_p, s_c_b, s_c_l, s_c_g, s_c_n, s_seq_b, s_seq_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DSTATE: tl.constexpr,
):
    """y_t = exp(cs_t) C_t . state_in + sum_{s<=t} (C_t . B_s) exp(cs_t - cs_s) dt_s x_s + D x_t, gated by z."""
    pid = tl.program_id(0)
    h = pid % nheads
    c = (pid // nheads) % nchunks
    b = pid // (nheads * nchunks)
    g = h // (nheads // ngroups)
    pid_m = tl.program_id(1)
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = c * chunk_size
    pos_t = (start + t).to(tl.int64)
    mt = (t < chunk_size) & (start + t < seqlen)
    mp = p < headdim
    cs_base = ((b * nheads + h).to(tl.int64) * nchunks + c) * chunk_size
    cs_t = tl.load(cs_ptr + cs_base + t, mask=t < chunk_size, other=0.0)
    reach = mt
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + b.to(tl.int64) * s_seq_b + pos_t * s_seq_l, mask=mt, other=-1)
        reach &= seq_t == _seq_at(seq_ptr, b, tl.maximum(start - 1, 0), s_seq_b, s_seq_l)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    C_base = C_ptr + b.to(tl.int64) * s_c_b + g * s_c_g + pos_t[:, None] * s_c_l
    state_base = states_ptr + ((b * nchunks + c) * nheads + h).to(tl.int64) * headdim * dstate + p[None, :] * dstate
    for n0 in range(0, dstate, BLOCK_DSTATE):
        n = n0 + tl.arange(0, BLOCK_DSTATE)
        Ct = tl.load(C_base + n[None, :] * s_c_n, mask=mt[:, None] & (n < dstate)[None, :], other=0.0)
        state = tl.load(state_base + n[:, None], mask=(n < dstate)[:, None] & mp[None, :], other=0.0)
        acc = _mm(Ct, state, acc, x_ptr, MODE, True, False)
    acc *= _decay(reach, cs_t)[:, None]

    x_base = x_ptr + b.to(tl.int64) * s_x_b + h * s_x_h + p[None, :] * s_x_p
    cb_base = cb_ptr + ((b * nchunks + c) * ngroups + g).to(tl.int64) * chunk_size * chunk_size
    for k0 in range(0, tl.minimum((pid_m + 1) * BLOCK_M, chunk_size), BLOCK_K):
        s = k0 + tl.arange(0, BLOCK_K)
        ms = (s < chunk_size) & (start + s < seqlen)
        keep = (s[None, :] <= t[:, None]) & ms[None, :] & mt[:, None]
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + b.to(tl.int64) * s_seq_b + (start + s).to(tl.int64) * s_seq_l, mask=ms, other=-2)
            keep &= seq_t[:, None] == seq_s[None, :]
        cb = tl.load(cb_base + t[:, None] * chunk_size + s[None, :], mask=keep, other=0.0)
        cs_s = tl.load(cs_ptr + cs_base + s, mask=s < chunk_size, other=0.0)
        dt_s = tl.load(dt_ptr + cs_base + s, mask=s < chunk_size, other=0.0)
        w = cb * _decay(keep, cs_t[:, None] - cs_s[None, :]) * dt_s[None, :]
        xs = tl.load(x_base + (start + s).to(tl.int64)[:, None] * s_x_l, mask=ms[:, None] & mp[None, :], other=0.0)
        acc = _mm(w, xs, acc, x_ptr, MODE, False, True)

    mask = mt[:, None] & mp[None, :]
    if HAS_D:
        xt = tl.load(x_base + pos_t[:, None] * s_x_l, mask=mask, other=0.0).to(tl.float32)
        acc += xt * tl.load(D_ptr + h * headdim + p, mask=mp, other=0.0)[None, :]
    # out and out_x are contiguous (b, l, h, p).
    off = ((b.to(tl.int64) * seqlen + start + t[:, None]) * nheads + h) * headdim + p[None, :]
    if HAS_Z:
        tl.store(out_x_ptr + off, acc, mask=mask)
        z = tl.load(z_ptr + b.to(tl.int64) * s_z_b + pos_t[:, None] * s_z_l + h * s_z_h + p[None, :] * s_z_p,
                    mask=mask, other=0.0).to(tl.float32)
        acc *= z * tl.sigmoid(z)
    tl.store(out_ptr + off, acc, mask=mask)
