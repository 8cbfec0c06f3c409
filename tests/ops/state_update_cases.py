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
