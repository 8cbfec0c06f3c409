"""Inputs and the reference check that the decode-step kernel tests (cpu, triton) share."""

import torch

from lnlm_ssm.ops import selective_state_update, selective_state_update_ref
from lnlm_ssm.utils.testing import assert_close, assert_close_to_ref

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
LOW = (bf16, f16)


def _randn(shape, dtype, *, noncontiguous=False, scale=1.0, device="cpu"):
    """``shape`` of N(0, scale^2); non-contiguous: reversed dimension order and a gap between elements."""
    if not noncontiguous:
        return (torch.randn(*shape, dtype=f64) * scale).to(device, dtype)
    base = (torch.randn(*reversed(shape), 2, dtype=f64) * scale).to(device, dtype)
    t = base[..., 0].permute(*reversed(range(len(shape))))
    assert t.shape == tuple(shape) and (t.numel() <= 1 or not t.is_contiguous())
    return t


def make_inputs(layout, dtype, state_dtype, *, dstate=16, batch=3, nheads=4, headdim=8, ngroups=2,
                noncontiguous=False, optional=True, per_head=True, device="cpu"):
    """Positional arguments of selective_state_update in the Mamba-1 or the Mamba-2 layout.

    Mamba-2 with ``per_head`` gets A, D, dt_bias as (nheads,) and dt as (batch, nheads),
    which the canonical form broadcasts with stride 0, as the Mamba2 module does.
    """
    nc = noncontiguous
    if layout == "mamba1":
        dim = nheads * headdim
        state = _randn((batch, dim, dstate), state_dtype, noncontiguous=nc, device=device)
        x, z = _randn((batch, dim), dtype, noncontiguous=nc, device=device), _randn((batch, dim), dtype, noncontiguous=nc, device=device)
        dt = _randn((batch, dim), dtype, noncontiguous=nc, scale=0.5, device=device)
        A = -torch.rand(dim, dstate, dtype=f32, device=device) * 2
        bc = (batch, ngroups, dstate) if ngroups > 1 else (batch, dstate)
        B, C = _randn(bc, dtype, noncontiguous=nc, device=device), _randn(bc, dtype, noncontiguous=nc, device=device)
        D, dt_bias = torch.randn(dim, dtype=f32, device=device), torch.randn(dim, dtype=f32, device=device) * 0.5
    else:
        state = _randn((batch, nheads, headdim, dstate), state_dtype, noncontiguous=nc, device=device)
        x, z = (_randn((batch, nheads, headdim), dtype, noncontiguous=nc, device=device) for _ in range(2))
        B, C = (_randn((batch, ngroups, dstate), dtype, noncontiguous=nc, device=device) for _ in range(2))
        if per_head:
            dt = _randn((batch, nheads), dtype, noncontiguous=nc, scale=0.5, device=device)
            A = -torch.rand(nheads, dtype=f32, device=device) * 2
            D, dt_bias = torch.randn(nheads, dtype=f32, device=device), torch.randn(nheads, dtype=f32, device=device) * 0.5
        else:
            dt = _randn((batch, nheads, headdim), dtype, noncontiguous=nc, scale=0.5, device=device)
            A = -torch.rand(nheads, headdim, dstate, dtype=f32, device=device) * 2
            D, dt_bias = torch.randn(nheads, headdim, dtype=f32, device=device), torch.randn(nheads, headdim, dtype=f32, device=device) * 0.5
    if not optional:
        D = z = dt_bias = None
    return state, x, dt, A, B, C, D, z, dt_bias


def to_float64(t):
    return None if t is None else t.to(f64)


def check_against_reference(args, backend, dt_softplus=True, msg=""):
    """Run ``backend`` and the reference on copies of the state; compare y and the new state."""
    state, x = args[0], args[1]
    dtype = x.dtype
    s_kernel, s_ref = state.clone(), state.clone()
    y = selective_state_update(s_kernel, *args[1:], dt_softplus=dt_softplus, backend=backend)
    y_ref = selective_state_update_ref(s_ref, *args[1:], dt_softplus=dt_softplus)
    assert y.dtype == dtype and y.shape == x.shape and s_kernel.dtype == state.dtype
    assert_close(y, y_ref, dtype, msg=f"{msg} y")
    assert_close(s_kernel, s_ref, state.dtype, msg=f"{msg} state")
    if dtype in LOW:
        s64 = state.to(f64)
        y64 = selective_state_update_ref(s64, *map(to_float64, args[1:]), dt_softplus=dt_softplus)
        assert_close_to_ref(y, y64, y_ref, msg=f"{msg} y vs float64")
        assert_close_to_ref(s_kernel, s64, s_ref, msg=f"{msg} state vs float64")
    return y, s_kernel


# ---------------------------------------------------------------- a state pool (state_batch_indices)

# Batch rows 0..3 step slots out of order in a pool of 6, row 1 is padding; slots 2 and 4 are nobody's.
SLOTS = (5, -1, 0, 3)
POOL = 6


def make_pooled_inputs(layout, dtype, state_dtype, *, slots=SLOTS, pool=POOL, index_dtype=torch.int64, **kwargs):
    """Arguments as :func:`make_inputs` for ``len(slots)`` batch rows, with ``state`` a pool of ``pool`` slots.

    Returns (args, indices).
    """
    device = kwargs.get("device", "cpu")
    args = make_inputs(layout, dtype, state_dtype, batch=len(slots), **kwargs)
    state = args[0]
    pool_state = _randn((pool, *state.shape[1:]), state_dtype, noncontiguous=kwargs.get("noncontiguous", False),
                        device=device)
    return (pool_state, *args[1:]), torch.tensor(slots, dtype=index_dtype, device=device)


def pooled_step_by_rows(args, indices, dt_softplus=True):
    """gather -> reference -> scatter, one batch row at a time: (y, new pool), leaving ``args`` as they are.

    Every argument with a batch dimension has it first, in both layouts.
    """
    pool, x, dt, A, B, C, D, z, dt_bias = args
    pool = pool.clone()
    y = torch.zeros_like(x)
    for b, slot in enumerate(indices.tolist()):
        if slot < 0:
            continue
        rows = slice(b, b + 1)
        row_state = pool[slot : slot + 1].clone()
        y[rows] = selective_state_update_ref(
            row_state, x[rows], dt[rows], A, B[rows], C[rows], D, None if z is None else z[rows], dt_bias, dt_softplus
        )
        pool[slot] = row_state[0]
    return y, pool


def check_pooled_against_reference(args, indices, backend, dt_softplus=True, msg=""):
    """Run ``backend`` on a copy of the pool; compare with :func:`pooled_step_by_rows`.

    Padding rows must give exactly 0 and the slots no row names must stay bit-identical.
    """
    pool, x = args[0], args[1]
    dtype = x.dtype
    pool_kernel = pool.clone()
    y = selective_state_update(
        pool_kernel, *args[1:], dt_softplus=dt_softplus, state_batch_indices=indices, backend=backend
    )
    y_ref, pool_ref = pooled_step_by_rows(args, indices, dt_softplus)
    assert y.dtype == dtype and y.shape == x.shape and pool_kernel.dtype == pool.dtype
    padding = indices < 0
    untouched = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
    untouched[indices[~padding]] = False
    assert torch.equal(y[padding], torch.zeros_like(y[padding])), f"{msg} padding rows must give 0"
    assert torch.equal(pool_kernel[untouched], pool[untouched]), f"{msg} slots no row names must stay as they were"
    assert_close(y, y_ref, dtype, msg=f"{msg} y")
    assert_close(pool_kernel, pool_ref, pool.dtype, msg=f"{msg} pool")
    if dtype in LOW:
        y64, pool64 = pooled_step_by_rows((pool.to(f64), *map(to_float64, args[1:])), indices, dt_softplus)
        assert_close_to_ref(y, y64, y_ref, msg=f"{msg} y vs float64")
        assert_close_to_ref(pool_kernel, pool64, pool_ref, msg=f"{msg} pool vs float64")
    return y, pool_kernel
