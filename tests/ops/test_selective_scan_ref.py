"""selective_scan_ref against an independent scalar loop, and its gradients."""

import pytest
import torch
import torch.nn.functional as F

from lnlm_ssm.ops import selective_scan_fn, selective_scan_ref
from lnlm_ssm.utils.testing import assert_close

f64 = torch.float64


def naive_selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus, h0):
    """Scalar-by-scalar Mamba-1 recurrence, written independently of the reference."""
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    grouped = B.ndim == 4
    per_group = dim // (B.shape[1] if grouped else 1)
    y = torch.zeros(batch, dim, seqlen, dtype=f64)
    last = torch.zeros(batch, dim, dstate, dtype=f64)
    for b in range(batch):
        for d in range(dim):
            g = d // per_group
            h = [float(h0[b, d, n]) if h0 is not None else 0.0 for n in range(dstate)]
            for t in range(seqlen):
                dt = float(delta[b, d, t]) + (float(delta_bias[d]) if delta_bias is not None else 0.0)
                if softplus:
                    dt = float(F.softplus(torch.tensor(dt, dtype=f64)))
                acc = 0.0
                for n in range(dstate):
                    Bv = float(B[b, g, n, t] if grouped else B[b, n, t])
                    Cv = float(C[b, g, n, t] if grouped else C[b, n, t])
                    h[n] = torch.exp(torch.tensor(dt * float(A[d, n]), dtype=f64)).item() * h[n] + dt * Bv * float(u[b, d, t])
                    acc += Cv * h[n]
                if D is not None:
                    acc += float(D[d]) * float(u[b, d, t])
                if z is not None:
                    acc *= float(F.silu(z[b, d, t]))
                y[b, d, t] = acc
            last[b, d] = torch.tensor(h, dtype=f64)
    return y, last


def make_inputs(batch=2, dim=4, seqlen=7, dstate=3, ngroups=None, dtype=f64, requires_grad=False):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=f64) * scale).to(dtype).requires_grad_(requires_grad)

    bc_shape = (batch, dstate, seqlen) if ngroups is None else (batch, ngroups, dstate, seqlen)
    return dict(
        u=r(batch, dim, seqlen),
        delta=r(batch, dim, seqlen, scale=0.5),
        A=(-torch.rand(dim, dstate, dtype=f64) * 2 - 0.1).requires_grad_(requires_grad),
        B=r(*bc_shape),
        C=r(*bc_shape),
        D=r(dim),
        z=r(batch, dim, seqlen),
        delta_bias=r(dim, scale=0.3),
        initial_state=r(batch, dim, dstate),
    )


@pytest.mark.parametrize("ngroups", [None, 1, 2])
@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("optional", ["all", "none"])
def test_matches_naive_loop(ngroups, softplus, optional):
    t = make_inputs(ngroups=ngroups)
    if optional == "none":
        t.update(D=None, z=None, delta_bias=None, initial_state=None)
    y, last = selective_scan_ref(
        t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], softplus, True,
        initial_state=t["initial_state"],
    )
    y_naive, last_naive = naive_selective_scan(
        t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], softplus, t["initial_state"]
    )
    assert_close(y, y_naive)
    assert_close(last, last_naive)


def test_gradcheck_all_inputs_and_last_state():
    t = make_inputs(batch=1, dim=2, seqlen=4, dstate=2, ngroups=1, requires_grad=True)

    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        y, last = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, True, True, initial_state=initial_state)
        return y, last

    assert torch.autograd.gradcheck(f, tuple(t.values()))


def test_low_precision_inputs_give_input_dtype_and_fp32_state():
    t = make_inputs(dim=8, seqlen=16, dstate=4, dtype=torch.bfloat16)
    t["A"] = t["A"].float()
    y, last = selective_scan_fn(**{k: v for k, v in t.items() if k != "initial_state"}, return_last_state=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    t64 = {k: v.double() for k, v in t.items() if k != "initial_state"}
    y64 = selective_scan_ref(**t64)
    assert_close(y, y64, torch.bfloat16)


def test_last_state_continues_the_scan():
    t = make_inputs(seqlen=10)
    args = lambda sl: (t["u"][..., sl], t["delta"][..., sl], t["A"], t["B"][..., sl], t["C"][..., sl], t["D"], t["z"][..., sl])
    y_full, last_full = selective_scan_ref(*args(slice(None)), return_last_state=True)
    y1, last1 = selective_scan_ref(*args(slice(0, 6)), return_last_state=True)
    y2, last2 = selective_scan_ref(*args(slice(6, None)), return_last_state=True, initial_state=last1)
    assert_close(torch.cat([y1, y2], -1), y_full)
    assert_close(last2, last_full)


def test_seqlen_zero():
    t = make_inputs(seqlen=0)
    y, last = selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], return_last_state=True, initial_state=t["initial_state"])
    assert y.shape == (2, 4, 0)
    assert_close(last, t["initial_state"])
