"""Decode step in Triton: one kernel, updating ``state`` in place.

The launcher takes the canonical form of ``shapes.py`` (state (b, h, p, n);
x, dt, z (b, h, p); A (h, p, n); B, C (b, g, n); D, dt_bias (h, p); any strides,
stride 0 included), as the cpu and cuda launchers do, and returns y
``(batch, nheads, headdim)`` in x's dtype.

The (head, headdim) pairs of one batch entry are flattened into rows: a program
takes a block of consecutive rows with their whole dstate, so Mamba-1 (headdim 1)
and Mamba-2 (headdim 64) both get wide tiles. B and C are gathered per row by
group. Block sizes follow from the shape, with no autotuning: the kernel is
memory bound and a first decode step should not wait for a tuning sweep.

With ``state_batch_indices`` the state is a pool: batch row b steps the slot
``state_batch_indices[b]``. A padding row (negative index) gets y = 0 with its
state loads and stores masked off; so does an index past the pool, which the
public function refuses before launching, so that a bad index can never write
outside the state.

Math runs in fp32; the state may be any float dtype and is written back in it.
float64 inputs are refused (backend "reference" or "cpu" do float64 math).
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


# Elements of state per program: enough to hide latency, few enough to stay in registers.
_TILE = 4096


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, idx_ptr, y_ptr,
    nheads, headdim, dstate, heads_per_group, pool,
    idx_s,
    s_sb, s_sh, s_sp, s_sn,
    x_sb, x_sh, x_sp,
    dt_sb, dt_sh, dt_sp,
    A_sh, A_sp, A_sn,
    B_sb, B_sg, B_sn,
    C_sb, C_sg, C_sn,
    D_sh, D_sp,
    z_sb, z_sh, z_sp,
    db_sh, db_sp,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    HAS_INDICES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Offsets in int64: a large state passes 2**31 elements.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.program_id(1).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    row_ok = rows < nheads * headdim
    n_ok = n < dstate
    mask = row_ok[:, None] & n_ok[None, :]
    h = rows // headdim
    p = rows % headdim
    g = h // heads_per_group
    if HAS_INDICES:
        slot = tl.load(idx_ptr + b * idx_s).to(tl.int64)
        live = (slot >= 0) & (slot < pool)
        slot = tl.where(live, slot, 0)
        # tl.where, not `mask & live`: the interpreter gives a block & a scalar the dtype int32, not a mask.
        state_mask = tl.where(live, mask, False)
    else:
        slot = b
        state_mask = mask

    x = tl.load(x_ptr + b * x_sb + h * x_sh + p * x_sp, mask=row_ok, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * dt_sb + h * dt_sh + p * dt_sp, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(dt_bias_ptr + h * db_sh + p * db_sp, mask=row_ok, other=0.0).to(tl.float32)
    if DT_SOFTPLUS:
        # torch's softplus threshold: linear above 20.
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
    A = tl.load(A_ptr + h[:, None] * A_sh + p[:, None] * A_sp + n[None, :] * A_sn, mask=mask, other=0.0)
    B = tl.load(B_ptr + b * B_sb + g[:, None] * B_sg + n[None, :] * B_sn, mask=mask, other=0.0)
    C = tl.load(C_ptr + b * C_sb + g[:, None] * C_sg + n[None, :] * C_sn, mask=mask, other=0.0)
    state_ptrs = state_ptr + slot * s_sb + h[:, None] * s_sh + p[:, None] * s_sp + n[None, :] * s_sn
    state = tl.load(state_ptrs, mask=state_mask, other=0.0).to(tl.float32)

    decay = tl.exp(dt[:, None] * A.to(tl.float32))
    state = decay * state + (dt * x)[:, None] * B.to(tl.float32)
    _store(state_ptrs, state, state_mask)

    y = _sum(state * C.to(tl.float32), axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + h * D_sh + p * D_sp, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * z_sb + h * z_sh + p * z_sp, mask=row_ok, other=0.0).to(tl.float32)
        y *= z * _sigmoid(z)
    if HAS_INDICES:
        y = tl.where(live, y, 0.0)
    _store(y_ptr + b * nheads * headdim + rows, y, row_ok)


def _strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    return (0,) * ndim if t is None else t.stride()


def _launch(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    dt_bias: Optional[torch.Tensor],
    dt_softplus: bool,
    state_batch_indices: Optional[torch.Tensor],
) -> torch.Tensor:
    pool, nheads, headdim, dstate = state.shape
    batch = x.shape[0]
    y = torch.empty((batch, nheads, headdim), dtype=x.dtype, device=x.device)
    rows = nheads * headdim
    if y.numel() == 0:
        return y
    block_n = triton.next_power_of_2(dstate)
    block_r = min(triton.next_power_of_2(rows), max(1, _TILE // block_n))
    grid = (triton.cdiv(rows, block_r), batch)
    _wrap(_state_update_kernel)[grid](
        state, x, dt, A, B, C, x if D is None else D, x if z is None else z, x if dt_bias is None else dt_bias,
        x if state_batch_indices is None else state_batch_indices, y,
        nheads, headdim, dstate, nheads // B.shape[1], pool,
        *_strides(state_batch_indices, 1),
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *_strides(D, 2), *_strides(z, 3), *_strides(dt_bias, 2),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus,
        HAS_INDICES=state_batch_indices is not None,
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=4 if block_r * block_n >= 1024 else 1,
    )
    return y


def _fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    return x.new_empty(x.shape)


_op = _library_op("selective_state_update", _launch, ("state",), _fake)


def selective_state_update_triton(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None
):
    refuse_float64("selective_state_update", "x", x)
    if any(stride == 0 and size > 1 for stride, size in zip(state.stride(), state.shape)):
        raise ValueError(
            "state is updated in place, so it must not be a view whose elements overlap (such as an expanded "
            f"tensor); got strides {state.stride()}"
        )
    return _op(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), state_batch_indices)
