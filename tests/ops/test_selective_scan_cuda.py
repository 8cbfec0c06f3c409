"""The CUDA selective scan (csrc/cuda/selective_scan) against the reference and the Triton kernel.

Needs a CUDA GPU and the extension lnlm_ssm._cuda; every test is skipped with the
reason otherwise, and nothing GPU-only is imported at module import. Outputs, the
last state and every gradient (through the last state and into the initial state
included) are compared with the reference: in float32 with the float32 tolerance,
in float16/bfloat16 with the flash-attention rule against the float64 reference.
"""

import pytest
import torch

from lnlm_ssm.ops import selective_scan_ref
from lnlm_ssm.utils.testing import assert_close, assert_close_to_ref
import scan_cases
from scan_cases import run


def _cuda_unavailable_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import lnlm_ssm.ops.selective_scan.cuda  # noqa: F401
    except ImportError as exc:
        return (
            f"the CUDA extension lnlm_ssm._cuda is not built ({exc}); build it with a CUDA build of torch "
            "and nvcc: LNLM_SSM_CUDA=1 pip install --no-build-isolation -v -e ."
        )
    return None


_REASON = _cuda_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

LOW_PRECISION = [torch.float16, torch.bfloat16]


def make_inputs(dim=12, seed=0, **kwargs):
    return scan_cases.make_inputs(dim=dim, seed=seed, device="cuda", **kwargs)


def to64(t):
    return {k: (None if v is None else v.double()) for k, v in t.items()}


def check_against_reference(fn, t, softplus=True):
    y, last, grads = fn_result = run(t, fn, softplus)
    dtype = t["u"].dtype
    assert y.dtype == dtype and last.dtype == torch.float32
    if dtype == torch.float32:
        y_ref, last_ref, grads_ref = run(t, selective_scan_ref, softplus)
        assert_close(y, y_ref, dtype, msg="y")
        assert_close(last, last_ref, dtype, msg="last_state")
        for name in grads_ref:
            assert_close(grads[name], grads_ref[name], dtype, msg=name)
    else:
        y_lowp, last_lowp, grads_lowp = run(t, selective_scan_ref, softplus)
        y64, last64, grads64 = run(to64(t), selective_scan_ref, softplus)
        assert_close_to_ref(y, y64, y_lowp, msg="y")
        assert_close_to_ref(last, last64, last_lowp, msg="last_state")
        for name in grads64:
            assert grads[name].dtype == t[name].dtype, name
            assert_close_to_ref(grads[name], grads64[name], grads_lowp[name], msg=name)
    return fn_result


@pytest.fixture
def scan():
    from lnlm_ssm.ops.selective_scan.cuda import selective_scan_cuda

    return selective_scan_cuda


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("seqlen", [1, 97, 1025])
@pytest.mark.parametrize("dstate", [1, 15, 64, 256])
def test_matches_reference(scan, dtype, seqlen, dstate):
    check_against_reference(scan, make_inputs(batch=2, dim=6, seqlen=seqlen, dstate=dstate, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [
        dict(dim=300, dstate=16, seqlen=70),  # several channel blocks, the last one partial
        dict(dim=12, ngroups=3, dstate=9),  # grouped B/C, fewer channels per group than a block
        dict(dim=256, ngroups=2, dstate=16, seqlen=600),  # chunks of 256 steps, a partial last chunk
        dict(batch=1, dim=5, dstate=5, seqlen=4),
    ],
)
def test_shapes(scan, dtype, shape):
    check_against_reference(scan, make_inputs(dtype=dtype, **shape))


@pytest.mark.parametrize("optional", [True, False])
@pytest.mark.parametrize("softplus", [True, False])
def test_optional_inputs(scan, optional, softplus):
    y, last, grads = check_against_reference(scan, make_inputs(optional=optional), softplus)
    expected = {"u", "delta", "A", "B", "C"} | ({"D", "z", "delta_bias", "initial_state"} if optional else set())
    assert grads.keys() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "time_invariant,shape",
    [
        ("B", dict(dim=300, dstate=16, seqlen=70)),  # several channel blocks, the last one partial
        ("C", dict(dim=12, ngroups=3, dstate=9)),  # grouped B
        ("BC", dict(dim=256, dstate=16, seqlen=600)),  # several chunks, a partial last one
        ("BC", dict(batch=1, dim=5, dstate=1, seqlen=4)),
        ("B", dict(dim=6, dstate=64, seqlen=97)),
    ],
)
def test_time_invariant_B_C(scan, dtype, time_invariant, shape):
    """(dim, dstate) B and / or C, read per channel; their gradients summed over batch and steps."""
    check_against_reference(scan, make_inputs(dtype=dtype, time_invariant=time_invariant, **shape))


def test_noncontiguous_time_invariant_B_C(scan):
    t = make_inputs(time_invariant="BC", dstate=8, seqlen=90)
    t["B"] = t["B"].t().contiguous().t()
    t["C"] = torch.randn(12, 16, device="cuda")[:, ::2]
    check_against_reference(scan, t)


def test_complex_A_goes_elsewhere():
    """The CUDA kernels have no complex form: "auto" passes them over and asking for them says why."""
    from lnlm_ssm.ops import BackendUnavailableError, selective_scan_fn

    t = make_inputs(dim=4, seqlen=10, dstate=3, time_invariant="B", complex_A=True)
    with pytest.raises(BackendUnavailableError, match="complex A is served by the 'reference', 'cpu', 'triton'"):
        selective_scan_fn(**t, backend="cuda")
    y, last = selective_scan_fn(**t, delta_softplus=True, return_last_state=True)
    y_ref, last_ref = selective_scan_ref(**t, delta_softplus=True, return_last_state=True)
    assert_close(y, y_ref, torch.float32)
    assert_close(torch.view_as_real(last), torch.view_as_real(last_ref), torch.float32)


def test_noncontiguous_inputs(scan):
    t = make_inputs(ngroups=2, noncontiguous=True, seqlen=90)
    assert not t["u"].is_contiguous() and not t["B"].is_contiguous()
    check_against_reference(scan, t)


def test_grad_through_last_state_only(scan):
    t = make_inputs(seqlen=300)
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    results = []
    for fn in (scan, selective_scan_ref):
        _, last = fn(**leaves, delta_softplus=True, return_last_state=True)
        results.append(torch.autograd.grad(last.sum(), [leaves["u"], leaves["A"], leaves["initial_state"]]))
    for g, g_ref in zip(*results):
        assert_close(g, g_ref, torch.float32)


def test_checkpoint_interval_changes_nothing(scan, monkeypatch):
    """Chunk boundaries every 64 steps instead of 256 leave every result as it was."""
    import lnlm_ssm.ops.selective_scan.cuda as scan_cuda_module

    t = make_inputs(seqlen=300)
    expected = run(t, scan)
    monkeypatch.setattr(scan_cuda_module, "CHECKPOINT_EVERY", 64)
    y, last, grads = run(t, scan)
    assert torch.equal(y, expected[0]) and torch.equal(last, expected[1])
    for name in grads:
        assert_close(grads[name], expected[2][name], torch.float32, msg=name)


def test_no_grad_forward_matches(scan):
    t = make_inputs(seqlen=130)
    with torch.no_grad():
        y, last = scan(**t, delta_softplus=True, return_last_state=True)
    y_ref, last_ref = selective_scan_ref(**t, delta_softplus=True, return_last_state=True)
    assert_close(y, y_ref, torch.float32)
    assert_close(last, last_ref, torch.float32)


def test_public_function_picks_cuda():
    from lnlm_ssm.ops import selective_scan_fn

    t = make_inputs()
    y = selective_scan_fn(**t, delta_softplus=True, backend="cuda")
    assert_close(y, selective_scan_ref(**t, delta_softplus=True), torch.float32)


def test_torch_compile_fullgraph(scan):
    t = make_inputs(dim=4, seqlen=16, dstate=4)

    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        y, last = scan(u, delta, A, B, C, D, z, delta_bias, True, True, initial_state=initial_state)
        return y.sum() + last.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [v.clone().requires_grad_(True) for v in t.values()]
    out = compiled(*leaves)
    out.backward()
    assert_close(out.detach(), f(*t.values()), torch.float32)
    assert all(v.grad is not None for v in leaves)


def _triton_scan_or_skip():
    from lnlm_ssm.ops import available_backends

    if "triton" not in available_backends():
        pytest.skip("the triton backend is not available")
    try:
        from lnlm_ssm.ops.selective_scan.triton import selective_scan_triton
    except ImportError as exc:
        pytest.skip(f"the triton backend has no selective_scan kernel ({exc})")
    return selective_scan_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_triton(scan, dtype):
    triton_scan = _triton_scan_or_skip()
    t = make_inputs(dim=40, ngroups=2, dstate=16, seqlen=200, dtype=dtype)
    y, last, grads = run(t, scan)
    y_tr, last_tr, grads_tr = run(t, triton_scan)
    # Both against each other with the tolerance of the inputs' dtype: two kernels
    # that each pass the reference test may differ by rounding only.
    assert_close(y, y_tr, dtype, msg="y")
    assert_close(last, last_tr, torch.float32 if dtype == torch.float32 else dtype, msg="last_state")
    for name in grads_tr:
        assert_close(grads[name], grads_tr[name], dtype, msg=name)


@pytest.mark.slow
def test_offsets_past_int32(scan):
    """batch * dim * seqlen > 2**31: the channels at the far end of a 2**31+ element bf16 tensor give
    exactly what the same channels give on their own (small offsets), and those match the reference.

    About 13 GB of GPU memory (u, delta and out, bf16); forward only.
    """
    batch, dim, seqlen, dstate = 1, 2**15 + 64, 2**16 + 3, 16
    assert batch * dim * seqlen > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 20 * 2**30:
        pytest.skip("needs a GPU with 20 GB of memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    u = torch.randn(batch, dim, seqlen, device="cuda", dtype=torch.bfloat16, generator=g)
    delta = torch.rand(batch, dim, seqlen, device="cuda", dtype=torch.bfloat16, generator=g).mul_(0.1)
    A = -torch.rand(dim, dstate, device="cuda", generator=g) - 0.5
    B = torch.randn(batch, dstate, seqlen, device="cuda", generator=g)
    C = torch.randn(batch, dstate, seqlen, device="cuda", generator=g)
    D = torch.randn(dim, device="cuda", generator=g)
    with torch.no_grad():
        y, last = scan(u, delta, A, B, C, D, return_last_state=True)
        tail = slice(dim - 64, dim)
        y_tail, last_tail = scan(u[:, tail].contiguous(), delta[:, tail].contiguous(), A[tail], B, C, D[tail],
                                 return_last_state=True)
    assert torch.equal(y[:, tail], y_tail) and torch.equal(last[:, tail], last_tail)
    short = slice(dim - 4, dim)
    y_ref = selective_scan_ref(u[:, short, :2048], delta[:, short, :2048], A[short], B[..., :2048], C[..., :2048],
                               D[short])
    y_short = scan(u[:, short, :2048], delta[:, short, :2048], A[short], B[..., :2048], C[..., :2048], D[short])
    assert torch.equal(y_short, y_tail[:, -4:, :2048])
    assert_close(y_short, y_ref, torch.bfloat16)
