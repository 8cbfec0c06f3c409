"""selective_scan_ref against an independent scalar loop, and its gradients."""

import cmath
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from lnlm_ssm.ops import selective_scan_fn, selective_scan_ref
from lnlm_ssm.utils.testing import assert_close
from scan_cases import make_inputs as make_scan_inputs

f64 = torch.float64


def naive_selective_scan(u, delta, A, B, C, D, z, delta_bias, softplus, h0):
    """Scalar-by-scalar Mamba-1 recurrence, written independently of the reference.

    B and C: time-invariant (dim, dstate), or time-varying (3-D, or 4-D grouped).
    Complex A (mamba_ssm's convention): the state is complex, a time-varying B or C
    holds (real, imaginary) pairs along its last axis, and y_t = 2 Re(C_t . h_t).
    """
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    is_complex = A.is_complex()
    grouped = [M.shape[1] for M in (B, C) if M.ndim == 4]
    per_group = dim // (grouped[0] if grouped else 1)

    def coefficient(M, b, d, n, t):
        if M.ndim == 2:
            return complex(M[d, n]) if is_complex else float(M[d, n])
        row = M[b, d // per_group] if M.ndim == 4 else M[b]
        return complex(float(row[n, 2 * t]), float(row[n, 2 * t + 1])) if is_complex else float(row[n, t])

    y = torch.zeros(batch, dim, seqlen, dtype=f64)
    last = torch.zeros(batch, dim, dstate, dtype=torch.complex128 if is_complex else f64)
    for b in range(batch):
        for d in range(dim):
            h = [(complex(h0[b, d, n]) if is_complex else float(h0[b, d, n])) if h0 is not None else 0.0
                 for n in range(dstate)]
            for t in range(seqlen):
                dt = float(delta[b, d, t]) + (float(delta_bias[d]) if delta_bias is not None else 0.0)
                if softplus:
                    dt = float(F.softplus(torch.tensor(dt, dtype=f64)))
                acc = 0.0
                for n in range(dstate):
                    a = complex(A[d, n]) if is_complex else float(A[d, n])
                    decay = cmath.exp(dt * a) if is_complex else math.exp(dt * a)
                    h[n] = decay * h[n] + dt * coefficient(B, b, d, n, t) * float(u[b, d, t])
                    acc += coefficient(C, b, d, n, t) * h[n]
                acc = 2 * acc.real if is_complex else acc
                if D is not None:
                    acc += float(D[d]) * float(u[b, d, t])
                if z is not None:
                    acc *= float(F.silu(z[b, d, t]))
                y[b, d, t] = acc
            last[b, d] = torch.tensor(h, dtype=last.dtype)
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


@pytest.mark.parametrize("complex_A", [False, True])
@pytest.mark.parametrize("time_invariant,ngroups", [("B", None), ("C", 2), ("BC", None), ("", 2), ("", None)])
def test_forms_of_B_C_and_complex_A_match_naive_loop(time_invariant, ngroups, complex_A):
    """Time-invariant B / C (each on its own) and complex A, as mamba_ssm defines them."""
    t = make_scan_inputs(batch=2, dim=4, seqlen=6, dstate=3, ngroups=ngroups, time_invariant=time_invariant,
                         complex_A=complex_A)
    t = {k: v.to(torch.complex128 if v.is_complex() else f64) for k, v in t.items()}
    y, last = selective_scan_ref(**t, delta_softplus=True, return_last_state=True)
    y_naive, last_naive = naive_selective_scan(
        t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True, t["initial_state"]
    )
    assert y.dtype == f64 and last.dtype == (torch.complex128 if complex_A else f64)
    assert_close(y, y_naive)
    assert_close(last, last_naive, f64)


def test_complex_state_dtypes():
    """Complex A: the state is complex64 (complex128 for float64 u); y keeps u's dtype."""
    t = make_scan_inputs(dim=3, seqlen=4, dstate=2, time_invariant="B", complex_A=True, dtype=torch.bfloat16)
    y, last = selective_scan_ref(**t, return_last_state=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.complex64
    t = {k: v.to(torch.complex128 if v.is_complex() else f64) for k, v in t.items()}
    assert selective_scan_ref(**t, return_last_state=True)[1].dtype == torch.complex128


def test_gradcheck_complex_A_and_time_invariant_B():
    t = make_scan_inputs(batch=1, dim=2, seqlen=3, dstate=2, time_invariant="B", complex_A=True)
    t = {k: v.to(torch.complex128 if v.is_complex() else f64).requires_grad_(True) for k, v in t.items()}

    def f(*args):
        y, last = selective_scan_ref(*args[:8], True, True, initial_state=args[8])
        return y, torch.view_as_real(last)

    assert torch.autograd.gradcheck(f, tuple(t.values()))


def test_signature_is_mamba_ssm_s():
    """mamba_ssm's parameters, positions and defaults; ours keyword-only after them."""
    incumbent = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state"]
    for fn, extra in ((selective_scan_ref, ["initial_state"]), (selective_scan_fn, ["initial_state", "backend"])):
        params = inspect.signature(fn).parameters
        assert list(params) == incumbent + extra
        assert all(params[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for name in incumbent)
        assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in extra)
        defaults = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
        assert defaults == {"D": None, "z": None, "delta_bias": None, "delta_softplus": False,
                            "return_last_state": False, "initial_state": None,
                            **({"backend": "auto"} if "backend" in extra else {})}
