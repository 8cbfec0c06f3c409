"""RMSNorm in Triton: fused residual add, z gating and groups, forward and backward.

Same call signature and semantics as ``reference.py``. x is viewed as rows of
``hidden`` channels; a program normalises a block of rows over one group of
``group_size`` channels (the whole row without groups). The forward saves only
1/rms per (row, group) beside its inputs; the backward recomputes x + residual
and the gate, and a fixed number of programs walk the rows so that the weight
and bias gradients are per-program partial sums, added up with torch:
deterministic, no atomics.

Math runs in fp32; y is in x's dtype, the new residual in the dtype the
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
from lnlm_ssm.utils.dtypes import math_dtype


# One group is held in registers: beyond this many channels it would spill.
MAX_GROUP = 65536
_TILE = 4096  # elements per program
_BWD_PROGRAMS = 256  # row-walking programs of the backward: rows of weight-gradient partials


@triton.jit
def _norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, res_ptr, z_ptr, y_ptr, res_out_ptr, rstd_ptr,
    rows, hidden, group, eps,
    x_sr, x_sc, r_sr, r_sc, z_sr, z_sc,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    STORE_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * group + j
    mask = (m < rows)[:, None] & (j < group)[None, :]
    m2, c2 = m[:, None], c[None, :]

    h = tl.load(x_ptr + m2 * x_sr + c2 * x_sc, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(res_ptr + m2 * r_sr + c2 * r_sc, mask=mask, other=0.0).to(tl.float32)
    if STORE_RES:
        _store(res_out_ptr + m2 * hidden + c2, h, mask)
    if HAS_Z:
        z = tl.load(z_ptr + m2 * z_sr + c2 * z_sc, mask=mask, other=0.0).to(tl.float32)
        gate = z * _sigmoid(z)
        if not NORM_BEFORE_GATE:
            h *= gate
    rstd = 1.0 / tl.sqrt(_sum(h * h, axis=1) / group + eps)
    tl.store(rstd_ptr + m * (hidden // group) + tl.program_id(1), rstd, mask=m < rows)
    w = tl.load(w_ptr + c, mask=j < group, other=0.0).to(tl.float32)
    y = h * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + c, mask=j < group, other=0.0).to(tl.float32)[None, :]
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y *= gate
    _store(y_ptr + m2 * hidden + c2, y, mask)


@triton.jit
def _norm_bwd_kernel(
    dy_ptr, dres_ptr, x_ptr, w_ptr, b_ptr, res_ptr, z_ptr, rstd_ptr,
    dx_ptr, dres_in_ptr, dz_ptr, dw_part_ptr, db_part_ptr,
    rows, hidden, group,
    dy_sr, dy_sc, dr_sr, dr_sc, x_sr, x_sc, r_sr, r_sc, z_sr, z_sc,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
    HAS_DRES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    j = tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * group + j
    c_ok = j < group
    c2 = c[None, :]
    w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    bias = tl.full((1, BLOCK_N), 0.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    dw = tl.full((BLOCK_N,), 0.0, tl.float32)
    db = tl.full((BLOCK_N,), 0.0, tl.float32)
    for start in range(tl.program_id(0) * BLOCK_M, rows, tl.num_programs(0) * BLOCK_M):
        m = start + tl.arange(0, BLOCK_M).to(tl.int64)
        mask = (m < rows)[:, None] & c_ok[None, :]
        m2 = m[:, None]
        r = tl.load(x_ptr + m2 * x_sr + c2 * x_sc, mask=mask, other=0.0).to(tl.float32)
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
        rstd = tl.load(rstd_ptr + m * (hidden // group) + tl.program_id(1), mask=m < rows, other=0.0)[:, None]
        n = h * rstd
        dy = tl.load(dy_ptr + m2 * dy_sr + c2 * dy_sc, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            if NORM_BEFORE_GATE:
                _store(dz_ptr + m2 * hidden + c2, dy * (n * w + bias) * dgate, mask)
                dy = dy * gate
        dw += _sum(dy * n, axis=0)
        db += _sum(dy, axis=0)
        dn = dy * w
        dh = rstd * (dn - n * (_sum(dn * n, axis=1) / group)[:, None])
        dr = dh
        if HAS_Z:
            if not NORM_BEFORE_GATE:
                _store(dz_ptr + m2 * hidden + c2, dh * r * dgate, mask)
                dr = dh * gate
        if HAS_DRES:
            dr += tl.load(dres_ptr + m2 * dr_sr + c2 * dr_sc, mask=mask, other=0.0).to(tl.float32)
        _store(dx_ptr + m2 * hidden + c2, dr, mask)
        if HAS_RES:
            _store(dres_in_ptr + m2 * hidden + c2, dr, mask)
    tl.store(dw_part_ptr + tl.program_id(0) * hidden + c, dw, mask=c_ok)
    if HAS_BIAS:
        tl.store(db_part_ptr + tl.program_id(0) * hidden + c, db, mask=c_ok)


def _blocks(group: int, rows: int) -> tuple[int, int]:
    block_n = triton.next_power_of_2(group)
    return min(triton.next_power_of_2(max(rows, 1)), max(1, _TILE // block_n)), block_n


def _strides2(t: Optional[torch.Tensor]) -> tuple:
    return (0, 0) if t is None else t.stride()


def _fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    eps: float,
    group: int,
    norm_before_gate: bool,
    residual_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual, z as (rows, hidden). Returns y, the new residual (empty unless
    ``residual_dtype`` is given) and 1/rms (rows, hidden // group) in fp32."""
    rows, hidden = x.shape
    y = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    res_out = torch.empty((rows, hidden) if residual_dtype is not None else (0,), dtype=residual_dtype or x.dtype,
                          device=x.device)
    rstd = torch.empty((rows, hidden // group), dtype=torch.float32, device=x.device)
    if rows * hidden == 0:
        return y, res_out, rstd
    block_m, block_n = _blocks(group, rows)
    grid = (triton.cdiv(rows, block_m), hidden // group)
    # An absent tensor's pointer is never read: any live tensor will do.
    _wrap(_norm_fwd_kernel)[grid](
        x, weight, x if bias is None else bias, x if residual is None else residual, x if z is None else z,
        y, y if residual_dtype is None else res_out, rstd,
        rows, hidden, group, eps,
        *x.stride(), *_strides2(residual), *_strides2(z),
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_Z=z is not None,
        NORM_BEFORE_GATE=norm_before_gate, STORE_RES=residual_dtype is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_n >= 8192 else 4,
    )
    return y, res_out, rstd


def _fwd_fake(x, weight, bias, residual, z, eps, group, norm_before_gate, residual_dtype):
    rows, hidden = x.shape
    return (
        x.new_empty((rows, hidden)),
        x.new_empty((rows, hidden) if residual_dtype is not None else (0,), dtype=residual_dtype or x.dtype),
        x.new_empty((rows, hidden // group), dtype=torch.float32),
    )


def _bwd(
    dy: torch.Tensor,
    dres: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    rstd: torch.Tensor,
    group: int,
    norm_before_gate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dresidual, dz in their inputs' dtypes; dweight, dbias in fp32; absent ones empty."""
    rows, hidden = x.shape
    dx = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    dres_in = torch.empty((rows, hidden) if residual is not None else (0,),
                          dtype=x.dtype if residual is None else residual.dtype, device=x.device)
    dz = torch.empty((rows, hidden) if z is not None else (0,), dtype=x.dtype if z is None else z.dtype,
                     device=x.device)
    block_m, block_n = _blocks(group, rows)
    programs = max(1, min(triton.cdiv(rows, block_m), _BWD_PROGRAMS))
    dw_part = torch.zeros((programs, hidden), dtype=torch.float32, device=x.device)
    db_part = torch.zeros((programs, hidden) if bias is not None else (0,), dtype=torch.float32, device=x.device)
    if rows * hidden > 0:
        _wrap(_norm_bwd_kernel)[(programs, hidden // group)](
            dy, dy if dres is None else dres, x, weight, x if bias is None else bias,
            x if residual is None else residual, x if z is None else z, rstd,
            dx, dx if residual is None else dres_in, dx if z is None else dz, dw_part,
            dw_part if bias is None else db_part,
            rows, hidden, group,
            *dy.stride(), *_strides2(dres), *x.stride(), *_strides2(residual), *_strides2(z),
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_Z=z is not None,
            NORM_BEFORE_GATE=norm_before_gate, HAS_DRES=dres is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_n >= 8192 else 4,
        )
    return dx, dres_in, dz, dw_part.sum(0), db_part.sum(0) if bias is not None else db_part


def _bwd_fake(dy, dres, x, weight, bias, residual, z, rstd, group, norm_before_gate):
    rows, hidden = x.shape
    return (
        x.new_empty((rows, hidden)),
        x.new_empty((rows, hidden) if residual is not None else (0,),
                    dtype=x.dtype if residual is None else residual.dtype),
        x.new_empty((rows, hidden) if z is not None else (0,), dtype=x.dtype if z is None else z.dtype),
        x.new_empty((hidden,), dtype=torch.float32),
        x.new_empty((hidden,) if bias is not None else (0,), dtype=torch.float32),
    )


_fwd_op = _library_op("rms_norm_fwd", _fwd, (), _fwd_fake)
_bwd_op = _library_op("rms_norm_bwd", _bwd, (), _bwd_fake)


def _rows(t: Optional[torch.Tensor], hidden: int) -> Optional[torch.Tensor]:
    return None if t is None else t.reshape(-1, hidden)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, z, eps, group, norm_before_gate, residual_dtype):
        hidden = x.shape[-1]
        x2, res2, z2 = _rows(x, hidden), _rows(residual, hidden), _rows(z, hidden)
        y, new_residual, rstd = _fwd_op(x2, weight, bias, res2, z2, eps, group, norm_before_gate, residual_dtype)
        ctx.save_for_backward(x2, weight, bias, res2, z2, rstd)
        ctx.group, ctx.norm_before_gate, ctx.shape = group, norm_before_gate, x.shape
        y = y.view(x.shape)
        return (y, new_residual.view(x.shape)) if residual_dtype is not None else y

    @staticmethod
    def backward(ctx, dy, dres=None):
        x2, weight, bias, res2, z2, rstd = ctx.saved_tensors
        hidden = x2.shape[1]
        dx, dres_in, dz, dweight, dbias = _bwd_op(
            _rows(dy, hidden), _rows(dres, hidden), x2, weight, bias, res2, z2, rstd, ctx.group, ctx.norm_before_gate
        )
        shape = ctx.shape
        return (
            dx.view(shape),
            dweight.to(weight.dtype),
            None if bias is None else dbias.to(bias.dtype),
            None if res2 is None else dres_in.view(shape),
            None if z2 is None else dz.view(shape),
            None,
            None,
            None,
            None,
        )


def rms_norm_triton(
    x,
    weight,
    bias=None,
    *,
    residual=None,
    z=None,
    eps=1e-6,
    group_size=None,
    norm_before_gate=True,
    prenorm=False,
    residual_in_fp32=False,
):
    refuse_float64("rms_norm_fn", "x", x, float64_backends="'reference'")
    group = x.shape[-1] if group_size is None else group_size
    if group > MAX_GROUP:
        raise ValueError(
            f"rms_norm_fn: backend 'triton' normalises at most {MAX_GROUP} channels at once, got a group of "
            f"{group} (hidden {x.shape[-1]}, group_size {group_size}); use backend='reference' or a smaller group_size"
        )
    residual_dtype = None
    if prenorm:
        residual_dtype = residual.dtype if residual is not None else x.dtype
        if residual_in_fp32:
            residual_dtype = math_dtype(residual_dtype)
    return _RMSNorm.apply(x, weight, bias, residual, z, float(eps), group, bool(norm_before_gate), residual_dtype)
