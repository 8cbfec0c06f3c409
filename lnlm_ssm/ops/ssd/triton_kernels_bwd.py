"""Triton kernels of the SSD backward that touch x, B and C (launched from ``triton.py``).

Layouts and masking as in ``triton_kernels.py``. dy is the gradient of the
scan's output before the z gate. With f_ts = (C_t . B_s) exp(cs_t - cs_s) dt_s
(dy_t . x_s) for s <= t, the gradient of the cumsum entry cs_k is the row sum
of f minus its column sum, plus the terms of the entering state (read out at
every t) and of the chunk's own state (decayed from every s to the end). The
row sums equal C_t . dC_t and the column sums B_s . dB_s per head, so the dC
and dB kernels produce them on the way (``dcs``); no T x T matrix of f is stored.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lnlm_ssm.ops.ssd.triton_kernels import _decay, _mm, _seq_at


@triton.jit
def chunk_scan_bwd_dx_kernel(
    x_ptr, dy_ptr, cb_ptr, dt_ptr, cs_ptr, B_ptr, dstates_ptr, D_ptr, seq_ptr, dx_ptr, ddt_ptr,
    seqlen, nheads, ngroups, nchunks, chunk_size, headdim, dstate,
    s_x_b, s_x_l, s_x_h, s_x_p, s_dy_b, s_dy_l, s_dy_h, s_dy_p, s_b_b, s_b_l, s_b_g, s_b_n, s_seq_b, s_seq_l,
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, MODE: tl.constexpr, DY_EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DSTATE: tl.constexpr,
):
    """dx_s = dt_s (sum_{t>=s} (C_t . B_s) exp(cs_t - cs_s) dy_t + exp(cs_last - cs_s) dstate_out B_s) + D dy_s;
    the bracket dotted with x_s is dt_s's direct gradient (partial over headdim blocks)."""
    pid = tl.program_id(0)
    h = pid % nheads
    c = (pid // nheads) % nchunks
    b = pid // (nheads * nchunks)
    g = h // (nheads // ngroups)
    pid_m, pid_n = tl.program_id(1), tl.program_id(2)
    s = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    start = c * chunk_size
    pos_s = (start + s).to(tl.int64)
    ms = (s < chunk_size) & (start + s < seqlen)
    mp = p < headdim
    cs_base = ((b * nheads + h).to(tl.int64) * nchunks + c) * chunk_size
    cs_s = tl.load(cs_ptr + cs_base + s, mask=s < chunk_size, other=0.0)
    cs_last = tl.load(cs_ptr + cs_base + chunk_size - 1)
    to_end = ms
    if HAS_SEQ:
        seq_s = tl.load(seq_ptr + b.to(tl.int64) * s_seq_b + pos_s * s_seq_l, mask=ms, other=-1)
        to_end &= seq_s == _seq_at(seq_ptr, b, tl.minimum(start + chunk_size, seqlen) - 1, s_seq_b, s_seq_l)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    B_base = B_ptr + b.to(tl.int64) * s_b_b + g * s_b_g + pos_s[:, None] * s_b_l
    ds_base = dstates_ptr + ((b * nchunks + c) * nheads + h).to(tl.int64) * headdim * dstate + p[None, :] * dstate
    for n0 in range(0, dstate, BLOCK_DSTATE):
        n = n0 + tl.arange(0, BLOCK_DSTATE)
        Bs = tl.load(B_base + n[None, :] * s_b_n, mask=ms[:, None] & (n < dstate)[None, :], other=0.0)
        ds = tl.load(ds_base + n[:, None], mask=(n < dstate)[:, None] & mp[None, :], other=0.0)
        acc = _mm(Bs, ds, acc, x_ptr, MODE, True, False)
    acc *= _decay(to_end, cs_last - cs_s)[:, None]

    dy_base = dy_ptr + b.to(tl.int64) * s_dy_b + h * s_dy_h + p[None, :] * s_dy_p
    cb_base = cb_ptr + ((b * nchunks + c) * ngroups + g).to(tl.int64) * chunk_size * chunk_size
    for k0 in range(pid_m * BLOCK_M, chunk_size, BLOCK_K):
        t = k0 + tl.arange(0, BLOCK_K)
        mt = (t < chunk_size) & (start + t < seqlen)
        keep = (t[None, :] >= s[:, None]) & mt[None, :] & ms[:, None]
        if HAS_SEQ:
            seq_t = tl.load(seq_ptr + b.to(tl.int64) * s_seq_b + (start + t).to(tl.int64) * s_seq_l, mask=mt, other=-2)
            keep &= seq_s[:, None] == seq_t[None, :]
        cb = tl.load(cb_base + t[None, :] * chunk_size + s[:, None], mask=keep, other=0.0)
        cs_t = tl.load(cs_ptr + cs_base + t, mask=t < chunk_size, other=0.0)
        w = cb * _decay(keep, cs_t[None, :] - cs_s[:, None])
        dyt = tl.load(dy_base + (start + t).to(tl.int64)[:, None] * s_dy_l, mask=mt[:, None] & mp[None, :], other=0.0)
        acc = _mm(w, dyt, acc, x_ptr, MODE, False, DY_EXACT)

    mask = ms[:, None] & mp[None, :]
    xs = tl.load(x_ptr + b.to(tl.int64) * s_x_b + pos_s[:, None] * s_x_l + h * s_x_h + p[None, :] * s_x_p,
                 mask=mask, other=0.0).to(tl.float32)
    # ddt: (headdim blocks, b, h, c, T), summed over the blocks by the launcher.
    tl.store(ddt_ptr + pid_n.to(tl.int64) * tl.num_programs(0) * chunk_size + cs_base + s,
             tl.sum(acc * xs, axis=1), mask=s < chunk_size)
    dt_s = tl.load(dt_ptr + cs_base + s, mask=s < chunk_size, other=0.0)
    dx = acc * dt_s[:, None]
    if HAS_D:
        dys = tl.load(dy_base + pos_s[:, None] * s_dy_l, mask=mask, other=0.0).to(tl.float32)
        dx += dys * tl.load(D_ptr + h * headdim + p, mask=mp, other=0.0)[None, :]
    # dx is contiguous (b, l, h, p).
    tl.store(dx_ptr + ((b.to(tl.int64) * seqlen + start + s[:, None]) * nheads + h) * headdim + p[None, :], dx, mask=mask)


@triton.jit
def chunk_scan_bwd_dbc_kernel(
    x_ptr, dy_ptr, B_ptr, C_ptr, dt_ptr, cs_ptr, states_ptr, seq_ptr, out_ptr, dcs_ptr, dlast_ptr,
    seqlen, nheads, ngroups, nchunks, chunk_size, headdim, dstate, heads_per_prog,
    s_x_b, s_x_l, s_x_h, s_x_p, s_dy_b, s_dy_l, s_dy_h, s_dy_p, s_b_b, s_b_l, s_b_g, s_b_n,
    s_c_b, s_c_l, s_c_g, s_c_n, s_seq_b, s_seq_l,
    FOR_B: tl.constexpr, HAS_SEQ: tl.constexpr, MODE: tl.constexpr, DY_EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dC (FOR_B false) or dB of a group, summed over a slice of its heads (one slice per program_id(2)).

    Rows r are the positions whose gradient is computed, columns k the positions they pair with:
    dC_t = sum_{s<=t} P_ts B_s + exp(cs_t) dy_t state_in,   with P_ts = exp(cs_t - cs_s) dt_s (dy_t . x_s);
    dB_s = sum_{t>=s} P_ts C_t + exp(cs_last - cs_s) dt_s x_s dstate_out.
    Per head, dcs gets +C_t . dC_t (dC pass, which runs first and writes it) and -B_s . dB_s
    (dB pass, which adds); dlast gets the chunk-state part of sum_s B_s . dB_s (partial per row block).
    """
    pid = tl.program_id(0)
    g = pid % ngroups
    c = (pid // ngroups) % nchunks
    b = pid // (ngroups * nchunks)
    pid_m, split = tl.program_id(1), tl.program_id(2)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    start = c * chunk_size
    pos_r = (start + r).to(tl.int64)
    mr = (r < chunk_size) & (start + r < seqlen)
    mp = p < headdim
    mn = n < dstate
    if FOR_B:
        # x is the row operand, dy the column one, C the matrix the pairs read.
        row_ptr, s_r_b, s_r_l, s_r_h, s_r_p = x_ptr, s_x_b, s_x_l, s_x_h, s_x_p
        col_ptr, s_k_b, s_k_l, s_k_h, s_k_p = dy_ptr, s_dy_b, s_dy_l, s_dy_h, s_dy_p
        mat_ptr, s_m_b, s_m_l, s_m_g, s_m_n = C_ptr, s_c_b, s_c_l, s_c_g, s_c_n
        own_ptr, s_o_b, s_o_l, s_o_g, s_o_n = B_ptr, s_b_b, s_b_l, s_b_g, s_b_n
        lo = pid_m * BLOCK_M
        hi = chunk_size
        ROWS_EXACT: tl.constexpr = True
        COLS_EXACT: tl.constexpr = DY_EXACT
    else:
        row_ptr, s_r_b, s_r_l, s_r_h, s_r_p = dy_ptr, s_dy_b, s_dy_l, s_dy_h, s_dy_p
        col_ptr, s_k_b, s_k_l, s_k_h, s_k_p = x_ptr, s_x_b, s_x_l, s_x_h, s_x_p
        mat_ptr, s_m_b, s_m_l, s_m_g, s_m_n = B_ptr, s_b_b, s_b_l, s_b_g, s_b_n
        own_ptr, s_o_b, s_o_l, s_o_g, s_o_n = C_ptr, s_c_b, s_c_l, s_c_g, s_c_n
        lo = 0
        hi = tl.minimum((pid_m + 1) * BLOCK_M, chunk_size)
        ROWS_EXACT: tl.constexpr = DY_EXACT
        COLS_EXACT: tl.constexpr = True
    own = tl.load(own_ptr + b.to(tl.int64) * s_o_b + pos_r[:, None] * s_o_l + g * s_o_g + n[None, :] * s_o_n,
                  mask=mr[:, None] & mn[None, :], other=0.0).to(tl.float32)
    if HAS_SEQ:
        seq_r = tl.load(seq_ptr + b.to(tl.int64) * s_seq_b + pos_r * s_seq_l, mask=mr, other=-1)
        if FOR_B:
            ref_seq = _seq_at(seq_ptr, b, tl.minimum(start + chunk_size, seqlen) - 1, s_seq_b, s_seq_l)
        else:
            ref_seq = _seq_at(seq_ptr, b, tl.maximum(start - 1, 0), s_seq_b, s_seq_l)

    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    heads_per_group = nheads // ngroups
    for i in range(0, heads_per_prog):
        h = g * heads_per_group + split * heads_per_prog + i
        cs_base = ((b * nheads + h).to(tl.int64) * nchunks + c) * chunk_size
        cs_r = tl.load(cs_ptr + cs_base + r, mask=r < chunk_size, other=0.0)
        rows = tl.load(row_ptr + b.to(tl.int64) * s_r_b + pos_r[:, None] * s_r_l + h * s_r_h + p[None, :] * s_r_p,
                       mask=mr[:, None] & mp[None, :], other=0.0)
        # The state term: the chunk's own state (dB) or the entering state (dC), (p, n).
        state = tl.load(states_ptr + ((b * nchunks + c) * nheads + h).to(tl.int64) * headdim * dstate
                        + p[:, None] * dstate + n[None, :], mask=mp[:, None] & mn[None, :], other=0.0)
        from_state = _mm(rows, state, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, MODE,
                         ROWS_EXACT, False)
        state_keep = mr
        if HAS_SEQ:
            state_keep &= seq_r == ref_seq
        if FOR_B:
            cs_last = tl.load(cs_ptr + cs_base + chunk_size - 1)
            dt_r = tl.load(dt_ptr + cs_base + r, mask=r < chunk_size, other=0.0)
            from_state *= (_decay(state_keep, cs_last - cs_r) * dt_r)[:, None]
        else:
            from_state *= _decay(state_keep, cs_r)[:, None]

        pairs = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(lo, hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            pos_k = (start + k).to(tl.int64)
            mk = (k < chunk_size) & (start + k < seqlen)
            cols = tl.load(col_ptr + b.to(tl.int64) * s_k_b + pos_k[None, :] * s_k_l + h * s_k_h + p[:, None] * s_k_p,
                           mask=mp[:, None] & mk[None, :], other=0.0)
            inner = _mm(rows, cols, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), x_ptr, MODE,
                        ROWS_EXACT, COLS_EXACT)
            cs_k = tl.load(cs_ptr + cs_base + k, mask=k < chunk_size, other=0.0)
            keep = mr[:, None] & mk[None, :]
            if FOR_B:
                keep &= k[None, :] >= r[:, None]
                log_decay = cs_k[None, :] - cs_r[:, None]
            else:
                keep &= k[None, :] <= r[:, None]
                log_decay = cs_r[:, None] - cs_k[None, :]
            if HAS_SEQ:
                seq_k = tl.load(seq_ptr + b.to(tl.int64) * s_seq_b + pos_k * s_seq_l, mask=mk, other=-2)
                keep &= seq_r[:, None] == seq_k[None, :]
            weight = tl.where(keep, inner, 0.0) * _decay(keep, log_decay)
            if not FOR_B:
                weight *= tl.load(dt_ptr + cs_base + k, mask=k < chunk_size, other=0.0)[None, :]
            mat = tl.load(mat_ptr + b.to(tl.int64) * s_m_b + pos_k[:, None] * s_m_l + g * s_m_g + n[None, :] * s_m_n,
                          mask=mk[:, None] & mn[None, :], other=0.0)
            pairs = _mm(weight, mat, pairs, x_ptr, MODE, False, True)
        if FOR_B:
            grad = from_state + pairs * dt_r[:, None]
        else:
            grad = from_state + pairs
        dcs_off = cs_base + r
        if FOR_B:
            old = tl.load(dcs_ptr + dcs_off, mask=r < chunk_size, other=0.0)
            tl.store(dcs_ptr + dcs_off, old - tl.sum(grad * own, axis=1), mask=r < chunk_size)
            tl.store(dlast_ptr + ((b * nheads + h) * nchunks + c).to(tl.int64) * tl.num_programs(1) + pid_m,
                     tl.sum(tl.sum(from_state * own, axis=1), axis=0))
        else:
            tl.store(dcs_ptr + dcs_off, tl.sum(grad * own, axis=1), mask=r < chunk_size)
        total += grad
    # out: (splits, b, l, g, n) fp32, summed over the splits by the launcher.
    batch = tl.num_programs(0) // (ngroups * nchunks)
    row = (split * batch + b).to(tl.int64) * seqlen + start + r
    tl.store(out_ptr + (row[:, None] * ngroups + g) * dstate + n[None, :], total, mask=mr[:, None] & mn[None, :])
