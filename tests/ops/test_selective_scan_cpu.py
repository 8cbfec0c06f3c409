"""The C++ CPU selective scan against the reference: outputs, last state and every gradient."""

import pytest
import torch

import lnlm_ssm.ops.selective_scan.cpu as scan_cpu_module
from lnlm_ssm.ops import available_backends, selective_scan_fn, selective_scan_ref
from lnlm_ssm.utils.testing import assert_close, assert_close_to_ref
from scan_cases import as_real, make_inputs, run

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="the C++ extension lnlm_ssm._C is not built")


def to64(t):
    """Float64 (complex128 for complex tensors) copies of the inputs."""
    return {k: None if v is None else v.to(torch.complex128 if v.is_complex() else torch.float64) for k, v in t.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "shape",
    [
        dict(),
        dict(seqlen=1),
        dict(seqlen=97, dstate=1),
        dict(seqlen=130, dstate=16, ngroups=1),
        dict(dim=6, ngroups=3, dstate=9),
        dict(batch=1, dim=3, seqlen=1025, dstate=3),
    ],
)
def test_matches_reference(dtype, shape):
    t = make_inputs(dtype=dtype, **shape)
    y, last, grads = run(t, "cpu")
    y_ref, last_ref, grads_ref = run(t, "reference")
    assert y.dtype == dtype and last.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(y, y_ref, dtype)
    assert_close(last, last_ref, dtype)
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], dtype, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("complex_A", [False, True])
@pytest.mark.parametrize(
    "time_invariant,shape",
    [
        ("B", dict()),
        ("C", dict(dim=6, ngroups=3, dstate=9, seqlen=150)),  # grouped B, several checkpoints, dstate padded
        ("BC", dict(batch=1, seqlen=1, dstate=1)),
        ("", dict(dim=3, seqlen=130, dstate=16, ngroups=1)),
    ],
)
def test_time_invariant_B_C_and_complex_A(dtype, complex_A, time_invariant, shape):
    """mamba_ssm's other forms of B and C, and complex A, against the reference: outputs, state, every gradient."""
    t = make_inputs(dtype=dtype, time_invariant=time_invariant, complex_A=complex_A, **shape)
    y, last, grads = run(t, "cpu")
    y_ref, last_ref, grads_ref = run(t, "reference")
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and last.dtype == (state_dtype.to_complex() if complex_A else state_dtype)
    assert_close(y, y_ref, dtype)
    assert_close(as_real(last), as_real(last_ref), dtype)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert grads[name].shape == t[name].shape and grads[name].dtype == grads_ref[name].dtype, name
        assert_close(as_real(grads[name]), as_real(grads_ref[name]), dtype, msg=name)


@pytest.mark.parametrize("optional", [True, False])
@pytest.mark.parametrize("softplus", [True, False])
def test_optional_inputs(optional, softplus):
    t = make_inputs(dtype=torch.float64, optional=optional)
    y, last, grads = run(t, "cpu", softplus)
    y_ref, last_ref, grads_ref = run(t, "reference", softplus)
    assert_close(y, y_ref)
    assert_close(last, last_ref)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("time_invariant,complex_A", [("", False), ("BC", False), ("B", True)])
def test_low_precision(dtype, time_invariant, complex_A):
    """Error against the float64 reference at most twice that of the reference run on the same low-precision inputs."""
    t = make_inputs(dim=8, seqlen=64, dstate=16, dtype=dtype, time_invariant=time_invariant, complex_A=complex_A)
    y, last, grads = run(t, "cpu")
    y_lowp, last_lowp, grads_lowp = run(t, "reference")
    y64, last64, grads64 = run(to64(t), "reference")
    assert y.dtype == dtype
    assert_close_to_ref(y, y64, y_lowp, msg="y")
    assert_close_to_ref(as_real(last), as_real(last64), as_real(last_lowp), msg="last_state")
    for name in grads64:
        assert_close_to_ref(as_real(grads[name]), as_real(grads64[name]), as_real(grads_lowp[name]), msg=name)


@pytest.mark.parametrize("time_invariant,complex_A", [("", False), ("B", False), ("C", True)])
def test_noncontiguous_inputs(time_invariant, complex_A):
    t = make_inputs(dtype=torch.float64, ngroups=1, noncontiguous=True, time_invariant=time_invariant,
                    complex_A=complex_A)
    assert not t["u"].is_contiguous() and not t["B"].is_contiguous()
    y, last, grads = run(t, "cpu")
    y_ref, last_ref, grads_ref = run(t, "reference")
    assert_close(y, y_ref)
    for name in grads_ref:
        assert_close(as_real(grads[name]), as_real(grads_ref[name]), torch.float64, msg=name)


@pytest.mark.parametrize("every", [128, 1024])
@pytest.mark.parametrize("complex_A", [False, True])
def test_checkpoint_interval_changes_nothing(every, complex_A, monkeypatch):
    """Chunk boundaries of the backward's recomputation inside the sequence leave every result as it was."""
    t = make_inputs(dtype=torch.float64, seqlen=150, complex_A=complex_A)
    expected = run(t, "cpu")
    monkeypatch.setattr(scan_cpu_module, "CHECKPOINT_EVERY", every)
    y, last, grads = run(t, "cpu")
    assert_close(y, expected[0])
    assert_close(as_real(last), as_real(expected[1]), torch.float64)
    for name in grads:
        assert_close(as_real(grads[name]), as_real(expected[2][name]), torch.float64, msg=name)


@pytest.mark.parametrize("time_invariant,complex_A", [("", False), ("BC", False), ("C", True)])
def test_threads_agree(time_invariant, complex_A):
    t = make_inputs(dim=16, seqlen=200, dstate=16, time_invariant=time_invariant, complex_A=complex_A)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(t, "cpu")
        torch.set_num_threads(2)
        two = run(t, "cpu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    for name in one[2]:
        assert_close(as_real(one[2][name]), as_real(two[2][name]), torch.float32, msg=name)


def test_grad_through_last_state_only():
    t = make_inputs(dtype=torch.float64)
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    for backend in ("cpu", "reference"):
        _, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
        grads = torch.autograd.grad(last.sum(), [leaves["u"], leaves["A"], leaves["initial_state"]])
        if backend == "cpu":
            cpu_grads = grads
    for g, g_ref in zip(cpu_grads, grads):
        assert_close(g, g_ref)


def test_no_grad_forward_matches():
    t = make_inputs()
    with torch.no_grad():
        y = selective_scan_fn(**t, delta_softplus=True, backend="cpu")
    assert_close(y, selective_scan_ref(**t, delta_softplus=True))


@pytest.mark.parametrize("time_invariant,complex_A", [("", False), ("C", True)])
def test_torch_compile_fullgraph(time_invariant, complex_A):
    t = make_inputs(dim=4, seqlen=16, dstate=4, time_invariant=time_invariant, complex_A=complex_A)

    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        y, last = selective_scan_fn(
            u, delta, A, B, C, D, z, delta_bias, True, True, initial_state=initial_state, backend="cpu"
        )
        return y.sum() + as_real(last).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [v.clone().requires_grad_(True) for v in t.values()]
    out = compiled(*leaves)
    out.backward()
    expected = f(*t.values())
    assert_close(out.detach(), expected)
    assert all(v.grad is not None for v in leaves)


def test_extreme_decays_match_reference():
    """The kernel's exp at its edges: decay flushed to 0, decay overflowing to inf, and NaN in A."""
    u = torch.ones(1, 5, 3)
    delta = torch.ones(1, 5, 3)
    A = torch.tensor([[-1000.0], [-88.0], [-87.0], [float("nan")], [100.0]])
    B = torch.ones(1, 1, 3)
    C = torch.ones(1, 1, 3)
    y = selective_scan_fn(u, delta, A, B, C, backend="cpu")
    y_ref = selective_scan_ref(u, delta, A, B, C)
    assert torch.equal(y[:, :3], y_ref[:, :3])
    assert y[:, 3:].isnan().all() and y_ref[:, 3:].isnan().all()
