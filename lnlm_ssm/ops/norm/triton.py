"""LayerNorm and RMSNorm in Triton, forward and backward, for every option of ``reference.py``.

One kernel pair serves both public families: Add -> Norm (rowscale, dropout of
x and x1, residual add, a second output y1 = norm ⊙ weight1 + bias1) and the
gated norm (z gating before or after, per group of ``group_size`` channels).
Each option is a compile-time flag, so a call pays only for what it uses. x is
viewed as rows of ``hidden`` channels; a program normalises a block of rows over
one group (the whole row without groups). The forward saves only 1/std (and the
mean, for LayerNorm) per (row, group) beside its inputs; the backward recomputes
the normalised input, and a fixed number of programs walk the rows so that the
weight and bias gradients are per-program partial sums, added up with torch:
deterministic, no atomics.

Dropout draws its mask in the kernel from one seed per call (drawn with torch's
generator, so ``torch.manual_seed`` fixes it) and a counter-based hash of
(row, channel, which input), and the backward draws the same mask again: no mask
is kept unless the caller asks for it.

Math runs in fp32; y and y1 are in x's dtype, the new residual in the dtype the
reference gives it, gradients in their input's dtype. float64 inputs are
refused (backend "reference" does float64 math). Block sizes follow from the
shape, with no autotuning.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from lnlm_ssm.ops._triton import library_op as _library_op
from lnlm_ssm.ops._triton import refuse_float64
from lnlm_ssm.ops._triton import reduce_sum as _sum
from lnlm_ssm.ops._triton import sigmoid as _sigmoid
from lnlm_ssm.ops._triton import store_rounded as _store
from lnlm_ssm.ops._triton import wrap as _wrap
from lnlm_ssm.ops.norm.reference import outputs, residual_dtype


# One group is held in registers: beyond this many channels it would spill.
MAX_GROUP = 65536
_TILE = 4096  # elements per program
_BWD_PROGRAMS = 256  # row-walking programs of the backward: rows of weight-gradient partials
_SEED_BOUND = 2**62  # seeds are drawn in [0, this): two 32-bit key words


@triton.jit
def _keep(seed, m, c, STREAM: tl.constexpr, dropout_p):
    """Dropout's keep decision for rows m (BLOCK_M, 1), channels c (1, BLOCK_N) of input STREAM (0: x, 1: x1).

    Philox-4x32 (Salmon et al., SC'11) with 7 rounds, the fewest that passed the
    authors' BigCrush runs: the counter is (channel, row low word, row high word, stream),
    the key the call's 64-bit seed. Written with Triton builtins only, as
    ``_triton.py`` asks, so that the interpreter runs it too.
    """
    zero = (m * 0 + c * 0).to(tl.uint32)
    c0 = zero + c.to(tl.uint32)
    c1 = zero + m.to(tl.uint32)
    c2 = zero + (m >> 32).to(tl.uint32)
    c3 = zero + STREAM
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    for _ in tl.static_range(7):
        p0 = c0.to(tl.uint64) * 0xD2511F53
        p2 = c2.to(tl.uint64) * 0xCD9E8D57
        c0, c1, c2, c3 = (
            (p2 >> 32).to(tl.uint32) ^ c1 ^ k0,
            p2.to(tl.uint32),
            (p0 >> 32).to(tl.uint32) ^ c3 ^ k1,
            p0.to(tl.uint32),
        )
        k0 += 0x9E3779B9
        k1 += 0xBB67AE85
    # The top 24 bits as a uniform in [0, 1), exact in fp32.
    return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0) >= dropout_p


@triton.jit
def _norm_fwd_kernel(
    x_ptr, x1_ptr, res_ptr, z_ptr, rowscale_ptr, seed_ptr, w_ptr, b_ptr, w1_ptr, b1_ptr,
    y_ptr, y1_ptr, res_out_ptr, mask_ptr, mask1_ptr, mean_ptr, rstd_ptr,
    rows, hidden, group, eps, dropout_p,
    x_sr, x_sc, x1_sr, x1_sc, r_sr, r_sc, z_sr, z_sc,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_X1: tl.constexpr, HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_MASK: tl.constexpr, STORE_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * group + j
    mask = (m < rows)[:, None] & (j < group)[None, :]
    m2, c2 = m[:, None], c[None, :]

    h = tl.load(x_ptr + m2 * x_sr + c2 * x_sc, mask=mask, other=0.0).to(tl.float32)
    if HAS_ROWSCALE:
        h *= tl.load(rowscale_ptr + m, mask=m < rows, other=0.0).to(tl.float32)[:, None]
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        keep = _keep(seed, m2, c2, 0, dropout_p)
        h = tl.where(keep, h / (1.0 - dropout_p), 0.0)
        if STORE_MASK:
            tl.store(mask_ptr + m2 * hidden + c2, keep, mask=mask)
    if HAS_X1:
        h1 = tl.load(x1_ptr + m2 * x1_sr + c2 * x1_sc, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep1 = _keep(seed, m2, c2, 1, dropout_p)
            h1 = tl.where(keep1, h1 / (1.0 - dropout_p), 0.0)
            if STORE_MASK:
                tl.store(mask1_ptr + m2 * hidden + c2, keep1, mask=mask)
        h += h1
    if HAS_RES:
        h += tl.load(res_ptr + m2 * r_sr + c2 * r_sc, mask=mask, other=0.0).to(tl.float32)
    if STORE_RES:
        _store(res_out_ptr + m2 * hidden + c2, h, mask)
    if HAS_Z:
        z = tl.load(z_ptr + m2 * z_sr + c2 * z_sc, mask=mask, other=0.0).to(tl.float32)
        gate = z * _sigmoid(z)
        if not NORM_BEFORE_GATE:
            h *= gate
    stat = m * (hidden // group) + tl.program_id(1)
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(_sum(h * h, axis=1) / group + eps)
        n = h * rstd[:, None]
    else:
        mean = _sum(h, axis=1) / group
        tl.store(mean_ptr + stat, mean, mask=m < rows)
        centred = tl.where(mask, h - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(_sum(centred * centred, axis=1) / group + eps)
        n = centred * rstd[:, None]
    tl.store(rstd_ptr + stat, rstd, mask=m < rows)
    w = tl.load(w_ptr + c, mask=j < group, other=0.0).to(tl.float32)
    y = n * w[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + c, mask=j < group, other=0.0).to(tl.float32)[None, :]
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y *= gate
    _store(y_ptr + m2 * hidden + c2, y, mask)
    if HAS_W1:
        y1 = n * tl.load(w1_ptr + c, mask=j < group, other=0.0).to(tl.float32)[None, :]
        if HAS_B1:
            y1 += tl.load(b1_ptr + c, mask=j < group, other=0.0).to(tl.float32)[None, :]
        _store(y1_ptr + m2 * hidden + c2, y1, mask)


@triton.jit
def _norm_bwd_kernel(
    dy_ptr, dy1_ptr, dres_ptr, x_ptr, x1_ptr, res_ptr, z_ptr, rowscale_ptr, seed_ptr, w_ptr, b_ptr, w1_ptr,
    mean_ptr, rstd_ptr,
    dx_ptr, dx1_ptr, dres_in_ptr, dz_ptr, drowscale_ptr, dw_part_ptr, db_part_ptr, dw1_part_ptr, db1_part_ptr,
    rows, hidden, group, dropout_p,
    dy_sr, dy_sc, dy1_sr, dy1_sc, dr_sr, dr_sc, x_sr, x_sc, x1_sr, x1_sc, r_sr, r_sc, z_sr, z_sc,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_X1: tl.constexpr, HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DRES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    j = tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * group + j
    c_ok = j < group
    c2 = c[None, :]
    w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    bias = tl.full((1, BLOCK_N), 0.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_W1:
        w1 = tl.load(w1_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    dw = tl.full((BLOCK_N,), 0.0, tl.float32)
    db = tl.full((BLOCK_N,), 0.0, tl.float32)
    dw1 = tl.full((BLOCK_N,), 0.0, tl.float32)
    db1 = tl.full((BLOCK_N,), 0.0, tl.float32)
    for start in range(tl.program_id(0) * BLOCK_M, rows, tl.num_programs(0) * BLOCK_M):
        m = start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (m < rows)[:, None] & c_ok[None, :]
        m2 = m[:, None]
        # Recompute the forward's input to the norm: r, then h (gated when the gate comes first).
        x = tl.load(x_ptr + m2 * x_sr + c2 * x_sc, mask=mask, other=0.0).to(tl.float32)
        r = x
        if HAS_ROWSCALE:
            rowscale = tl.load(rowscale_ptr + m, mask=m < rows, other=0.0).to(tl.float32)[:, None]
            r = x * rowscale
        if HAS_DROPOUT:
            keep = _keep(seed, m2, c2, 0, dropout_p)
            r = tl.where(keep, r / (1.0 - dropout_p), 0.0)
        if HAS_X1:
            h1 = tl.load(x1_ptr + m2 * x1_sr + c2 * x1_sc, mask=mask, other=0.0).to(tl.float32)
            if HAS_DROPOUT:
                keep1 = _keep(seed, m2, c2, 1, dropout_p)
                h1 = tl.where(keep1, h1 / (1.0 - dropout_p), 0.0)
            r += h1
        if HAS_RES:
            r += tl.load(res_ptr + m2 * r_sr + c2 * r_sc, mask=mask, other=0.0).to(tl.float32)
        h = r
        if HAS_Z:
            z = tl.load(z_ptr + m2 * z_sr + c2 * z_sc, mask=mask, other=0.0).to(tl.float32)
            sig = _sigmoid(z)
            gate = z * sig
            dgate = sig * (1.0 + z * (1.0 - sig))
            if not NORM_BEFORE_GATE:
                h = r * gate
        stat = m * (hidden // group) + tl.program_id(1)
        rstd = tl.load(rstd_ptr + stat, mask=m < rows, other=0.0)[:, None]
        if IS_RMS:
            n = h * rstd
        else:
            mean = tl.load(mean_ptr + stat, mask=m < rows, other=0.0)[:, None]
            n = tl.where(mask, (h - mean) * rstd, 0.0)
        dy = tl.load(dy_ptr + m2 * dy_sr + c2 * dy_sc, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            if NORM_BEFORE_GATE:
                _store(dz_ptr + m2 * hidden + c2, dy * (n * w + bias) * dgate, mask)
                dy = dy * gate
        dw += _sum(dy * n, axis=0)
        db += _sum(dy, axis=0)
        dn = dy * w
        if HAS_W1:
            dy1 = tl.load(dy1_ptr + m2 * dy1_sr + c2 * dy1_sc, mask=mask, other=0.0).to(tl.float32)
            dw1 += _sum(dy1 * n, axis=0)
            db1 += _sum(dy1, axis=0)
            dn += dy1 * w1
        if IS_RMS:
            dh = rstd * (dn - n * (_sum(dn * n, axis=1) / group)[:, None])
        else:
            dh = rstd * (dn - n * (_sum(dn * n, axis=1) / group)[:, None] - (_sum(dn, axis=1) / group)[:, None])
        dr = dh
        if HAS_Z:
            if not NORM_BEFORE_GATE:
                _store(dz_ptr + m2 * hidden + c2, dh * r * dgate, mask)
                dr = dh * gate
        if HAS_DRES:
            dr += tl.load(dres_ptr + m2 * dr_sr + c2 * dr_sc, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            _store(dres_in_ptr + m2 * hidden + c2, dr, mask)
        if HAS_X1:
            dx1 = dr
            if HAS_DROPOUT:
                dx1 = tl.where(keep1, dr / (1.0 - dropout_p), 0.0)
            _store(dx1_ptr + m2 * hidden + c2, dx1, mask)
        dx = dr
        if HAS_DROPOUT:
            dx = tl.where(keep, dr / (1.0 - dropout_p), 0.0)
        if HAS_ROWSCALE:
            # rowscale comes only without groups: this program holds the whole row.
            _store(drowscale_ptr + m, _sum(dx * x, axis=1), m < rows)
            dx = dx * rowscale
        _store(dx_ptr + m2 * hidden + c2, dx, mask)
    tl.store(dw_part_ptr + tl.program_id(0) * hidden + c, dw, mask=c_ok)
    if HAS_BIAS:
        tl.store(db_part_ptr + tl.program_id(0) * hidden + c, db, mask=c_ok)
    if HAS_W1:
        tl.store(dw1_part_ptr + tl.program_id(0) * hidden + c, dw1, mask=c_ok)
        if HAS_B1:
            tl.store(db1_part_ptr + tl.program_id(0) * hidden + c, db1, mask=c_ok)


def _blocks(group: int, rows: int) -> tuple[int, int]:
    block_n = triton.next_power_of_2(group)
    return min(triton.next_power_of_2(max(rows, 1)), max(1, _TILE // block_n)), block_n


def _strides2(t: Optional[torch.Tensor]) -> tuple:
    return (0, 0) if t is None else t.stride()


def _like(x: torch.Tensor, present: bool, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(rows, hidden) like x when ``present``, else an empty placeholder."""
    return torch.empty(x.shape if present else (0,), dtype=dtype or x.dtype, device=x.device)


def _fwd(
    x: torch.Tensor,
    x1: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    rowscale: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight1: Optional[torch.Tensor],
    bias1: Optional[torch.Tensor],
    eps: float,
    dropout_p: float,
    group: int,
    is_rms_norm: bool,
    norm_before_gate: bool,
    residual_dtype: Optional[torch.dtype],
    store_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, x1, residual, z as (rows, hidden); rowscale (rows,); seed (1,) int64 when dropout_p > 0.

    Returns y, y1, the new residual (only with ``residual_dtype``), the keep masks of x and x1 (only with
    ``store_mask``), mean (LayerNorm only) and 1/std, both (rows, hidden // group) in fp32; absent ones empty.
    """
    rows, hidden = x.shape
    y = _like(x, True)
    y1 = _like(x, weight1 is not None)
    res_out = _like(x, residual_dtype is not None, residual_dtype)
    mask = _like(x, store_mask, torch.bool)
    mask1 = _like(x, store_mask and x1 is not None, torch.bool)
    mean = torch.empty((rows, hidden // group) if not is_rms_norm else (0,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((rows, hidden // group), dtype=torch.float32, device=x.device)
    if rows * hidden == 0:
        return y, y1, res_out, mask, mask1, mean, rstd
    block_m, block_n = _blocks(group, rows)
    grid = (triton.cdiv(rows, block_m), hidden // group)
    # An absent tensor's pointer is never read: any live tensor will do.
    _wrap(_norm_fwd_kernel)[grid](
        x, x if x1 is None else x1, x if residual is None else residual, x if z is None else z,
        x if rowscale is None else rowscale, x if seed is None else seed,
        weight, x if bias is None else bias, x if weight1 is None else weight1, x if bias1 is None else bias1,
        y, y1, res_out, mask, mask1, rstd if is_rms_norm else mean, rstd,
        rows, hidden, group, eps, dropout_p,
        *x.stride(), *_strides2(x1), *_strides2(residual), *_strides2(z),
        IS_RMS=is_rms_norm, HAS_BIAS=bias is not None, HAS_X1=x1 is not None, HAS_W1=weight1 is not None,
        HAS_B1=bias1 is not None, HAS_RES=residual is not None, HAS_Z=z is not None,
        NORM_BEFORE_GATE=norm_before_gate, HAS_ROWSCALE=rowscale is not None, HAS_DROPOUT=dropout_p > 0.0,
        STORE_MASK=store_mask, STORE_RES=residual_dtype is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_n >= 8192 else 4,
    )
    return y, y1, res_out, mask, mask1, mean, rstd


def _fwd_fake(x, x1, residual, z, rowscale, seed, weight, bias, weight1, bias1, eps, dropout_p, group, is_rms_norm,
              norm_before_gate, residual_dtype, store_mask):
    rows, hidden = x.shape
    stats = (rows, hidden // group)
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape if weight1 is not None else (0,)),
        x.new_empty(x.shape if residual_dtype is not None else (0,), dtype=residual_dtype or x.dtype),
        x.new_empty(x.shape if store_mask else (0,), dtype=torch.bool),
        x.new_empty(x.shape if store_mask and x1 is not None else (0,), dtype=torch.bool),
        x.new_empty(stats if not is_rms_norm else (0,), dtype=torch.float32),
        x.new_empty(stats, dtype=torch.float32),
    )


def _grad_like(t: Optional[torch.Tensor], rows: int, hidden: int, device) -> torch.Tensor:
    return torch.empty((rows, hidden) if t is not None else (0,), dtype=torch.float32 if t is None else t.dtype,
                       device=device)


def _bwd(
    dy: torch.Tensor,
    dy1: Optional[torch.Tensor],
    dres: Optional[torch.Tensor],
    x: torch.Tensor,
    x1: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    rowscale: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight1: Optional[torch.Tensor],
    bias1: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dropout_p: float,
    group: int,
    is_rms_norm: bool,
    norm_before_gate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """dx, dx1, dresidual, dz, drowscale in their inputs' dtypes; dweight, dbias, dweight1, dbias1 in fp32;
    absent ones empty."""
    rows, hidden = x.shape
    dx = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    dx1, dres_in, dz = (_grad_like(t, rows, hidden, x.device) for t in (x1, residual, z))
    drowscale = torch.empty((rows,) if rowscale is not None else (0,),
                            dtype=torch.float32 if rowscale is None else rowscale.dtype, device=x.device)
    block_m, block_n = _blocks(group, rows)
    programs = max(1, min(triton.cdiv(rows, block_m), _BWD_PROGRAMS))

    def partials(present: bool) -> torch.Tensor:
        return torch.zeros((programs, hidden) if present else (0,), dtype=torch.float32, device=x.device)

    dw_part, db_part = partials(True), partials(bias is not None)
    dw1_part, db1_part = partials(weight1 is not None), partials(bias1 is not None)
    if rows * hidden > 0:
        _wrap(_norm_bwd_kernel)[(programs, hidden // group)](
            dy, dy if dy1 is None else dy1, dy if dres is None else dres,
            x, x if x1 is None else x1, x if residual is None else residual, x if z is None else z,
            x if rowscale is None else rowscale, x if seed is None else seed,
            weight, x if bias is None else bias, x if weight1 is None else weight1,
            rstd if is_rms_norm else mean, rstd,
            dx, dx1, dres_in, dz, drowscale, dw_part, db_part, dw1_part, db1_part,
            rows, hidden, group, dropout_p,
            *dy.stride(), *_strides2(dy1), *_strides2(dres), *x.stride(), *_strides2(x1), *_strides2(residual),
            *_strides2(z),
            IS_RMS=is_rms_norm, HAS_BIAS=bias is not None, HAS_X1=x1 is not None, HAS_W1=weight1 is not None,
            HAS_B1=bias1 is not None, HAS_RES=residual is not None, HAS_Z=z is not None,
            NORM_BEFORE_GATE=norm_before_gate, HAS_ROWSCALE=rowscale is not None, HAS_DROPOUT=dropout_p > 0.0,
            HAS_DRES=dres is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_n >= 8192 else 4,
        )
    sums = tuple(part.sum(0) if part.numel() else part for part in (dw_part, db_part, dw1_part, db1_part))
    return (dx, dx1, dres_in, dz, drowscale) + sums


def _bwd_fake(dy, dy1, dres, x, x1, residual, z, rowscale, seed, weight, bias, weight1, bias1, mean, rstd,
              dropout_p, group, is_rms_norm, norm_before_gate):
    rows, hidden = x.shape

    def like(t, shape):
        return x.new_empty(shape if t is not None else (0,), dtype=torch.float32 if t is None else t.dtype)

    def param(present):
        return x.new_empty((hidden,) if present else (0,), dtype=torch.float32)

    return (
        x.new_empty((rows, hidden)),
        like(x1, (rows, hidden)),
        like(residual, (rows, hidden)),
        like(z, (rows, hidden)),
        like(rowscale, (rows,)),
        param(True),
        param(bias is not None),
        param(weight1 is not None),
        param(bias1 is not None),
    )


_fwd_op = _library_op("norm_fwd", _fwd, (), _fwd_fake)
_bwd_op = _library_op("norm_bwd", _bwd, (), _bwd_fake)


def _rows(t: Optional[torch.Tensor], hidden: int) -> Optional[torch.Tensor]:
    return None if t is None else t.reshape(-1, hidden)


def _param(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # The kernels index weights and biases with unit stride.
    return None if t is None else t.contiguous()


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, x1, weight1, bias1, rowscale, z, eps, dropout_p, group, is_rms_norm,
                norm_before_gate, residual_dtype, store_mask):
        hidden = x.shape[-1]
        x2, res2, x12, z2 = (_rows(t, hidden) for t in (x, residual, x1, z))
        weight, bias, weight1, bias1 = (_param(t) for t in (weight, bias, weight1, bias1))
        rows_scale = None if rowscale is None else rowscale.reshape(-1).contiguous()
        seed = None
        if dropout_p > 0.0:
            seed = torch.randint(_SEED_BOUND, (1,), dtype=torch.int64, device=x.device)
        y, y1, new_residual, mask, mask1, mean, rstd = _fwd_op(
            x2, x12, res2, z2, rows_scale, seed, weight, bias, weight1, bias1, eps, dropout_p, group, is_rms_norm,
            norm_before_gate, residual_dtype, store_mask,
        )
        ctx.save_for_backward(x2, x12, res2, z2, rows_scale, seed, weight, bias, weight1, bias1, mean, rstd)
        ctx.options = (dropout_p, group, is_rms_norm, norm_before_gate)
        ctx.shape = x.shape
        ctx.rowscale_shape = None if rowscale is None else rowscale.shape
        ctx.has_residual_out = residual_dtype is not None
        ctx.mark_non_differentiable(mask, mask1)

        def shaped(t, present):
            return t.view(x.shape) if present else t

        return (
            y.view(x.shape),
            shaped(y1, weight1 is not None),
            shaped(new_residual, residual_dtype is not None),
            shaped(mask, store_mask),
            shaped(mask1, store_mask and x1 is not None),
        )

    @staticmethod
    def backward(ctx, dy, dy1, dres, _dmask, _dmask1):
        x2, x12, res2, z2, rows_scale, seed, weight, bias, weight1, bias1, mean, rstd = ctx.saved_tensors
        hidden = x2.shape[1]
        dx, dx1, dres_in, dz, drowscale, dweight, dbias, dweight1, dbias1 = _bwd_op(
            _rows(dy, hidden),
            None if weight1 is None else _rows(dy1, hidden),
            _rows(dres, hidden) if ctx.has_residual_out else None,
            x2, x12, res2, z2, rows_scale, seed, weight, bias, weight1, bias1, mean, rstd, *ctx.options,
        )
        shape = ctx.shape

        def cast(grad, like):
            return None if like is None else grad.to(like.dtype)

        return (
            dx.view(shape),
            dweight.to(weight.dtype),
            cast(dbias, bias),
            None if res2 is None else dres_in.view(shape),
            None if x12 is None else dx1.view(shape),
            cast(dweight1, weight1),
            cast(dbias1, bias1),
            None if rows_scale is None else drowscale.view(ctx.rowscale_shape),
            None if z2 is None else dz.view(shape),
        ) + (None,) * 7


def _check_group(op: str, group: int, x: torch.Tensor, group_size: Optional[int]) -> None:
    refuse_float64(op, "x", x, float64_backends="'reference'")
    if group > MAX_GROUP:
        raise ValueError(
            f"{op}: backend 'triton' normalises at most {MAX_GROUP} channels at once, got a group of "
            f"{group} (hidden {x.shape[-1]}, group_size {group_size}); use backend='reference'"
            + (" or a smaller group_size" if group_size is not None else "")
        )


def layer_norm_triton(
    x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm, residual_in_fp32,
    is_rms_norm, return_dropout_mask,
):
    """Backend "triton" of layer_norm_fn / rms_norm_fn (arguments as theirs, all given)."""
    _check_group("rms_norm_fn" if is_rms_norm else "layer_norm_fn", x.shape[-1], x, None)
    dropout = dropout_p > 0.0
    y, y1, new_residual, mask, mask1 = _Norm.apply(
        x, weight, bias, residual, x1, weight1, bias1, rowscale, None, float(eps), float(dropout_p), x.shape[-1],
        bool(is_rms_norm), True, residual_dtype(x, residual, residual_in_fp32) if prenorm else None,
        bool(return_dropout_mask and dropout),
    )
    masks = None
    if return_dropout_mask:
        masks = (mask if dropout else None, mask1 if dropout and x1 is not None else None)
    return outputs(y, None if weight1 is None else y1, new_residual if prenorm else None, masks)


def layernorm_gated_triton(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm):
    """Backend "triton" of layernorm_fn / rmsnorm_fn (arguments as theirs, all given)."""
    group = x.shape[-1] if group_size is None else group_size
    _check_group("rmsnorm_fn" if is_rms_norm else "layernorm_fn", group, x, group_size)
    return _Norm.apply(
        x, weight, bias, None, None, None, None, None, z, float(eps), 0.0, group, bool(is_rms_norm),
        bool(norm_before_gate), None, False,
    )[0]
