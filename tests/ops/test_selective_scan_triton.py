"""The Triton selective scan against the reference: outputs, last state and every gradient.

The kernels run in the Triton interpreter on CPU tensors, on machines without
a GPU (tests/conftest.py sets TRITON_INTERPRET=1 there; on a GPU machine these
tests skip and the GPU test below covers the compiled kernels). Triton 3.9 reads
TRITON_INTERPRET when a ``@triton.jit`` function is defined (through
``triton.knobs.runtime.interpret``), not when triton is imported, so the
variable is set here before the kernel module is imported. Should that module
have been imported earlier in the process without it (a GPU test run first),
the ``kernels`` fixture re-imports it under the interpreter. The GPU check runs
in a subprocess without the variable, so that it gets compiled kernels.
"""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from lnlm_ssm.ops import _backends, selective_scan_fn, selective_scan_ref  # noqa: E402
from lnlm_ssm.utils.testing import assert_close, assert_close_to_ref  # noqa: E402
from scan_cases import as_real, make_inputs, run  # noqa: E402


@pytest.fixture(scope="module")
def kernels():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter tests run where there is no GPU; test_gpu_compiled_kernels_match_reference covers GPUs")
    from triton.runtime.interpreter import InterpretedFunction

    module = importlib.import_module("lnlm_ssm.ops.selective_scan.triton")
    if not isinstance(module._bwd_kernel, InterpretedFunction):
        module = importlib.reload(module)
    # The backends' probe is cached: it may have run before the variable was set.
    _backends._probe.cache_clear()
    return module


@pytest.fixture
def small_chunks(kernels, monkeypatch):
    """Chunks of 16 steps, so that short sequences cross several checkpoints."""
    monkeypatch.setattr(kernels, "CHUNK", 16)





def check_fp32(t, softplus=True):
    y, last, grads = run(t, "triton", softplus)
    y_ref, last_ref, grads_ref = run(t, "reference", softplus)
    assert y.dtype == t["u"].dtype and last.dtype == torch.float32
    assert_close(y, y_ref, torch.float32, msg="y")
    assert_close(last, last_ref, torch.float32, msg="last_state")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert grads[name].dtype == grads_ref[name].dtype, name
        assert_close(grads[name], grads_ref[name], torch.float32, msg=name)


@pytest.mark.parametrize(
    "shape",
    [
        dict(),
        dict(seqlen=1),
        dict(batch=1, dim=2, seqlen=64, dstate=16),
        dict(batch=1, dim=3, seqlen=20, dstate=1),
        dict(dim=6, ngroups=3, dstate=3, seqlen=24),
    ],
)
def test_matches_reference(kernels, shape):
    check_fp32(make_inputs(**shape))


@pytest.mark.parametrize("shape", [dict(dim=3, seqlen=50), dict(seqlen=33, dim=4, ngroups=2, dstate=5)])
def test_several_chunks(small_chunks, shape):
    """The checkpoints at chunk boundaries: the backward recomputes each chunk from its own."""
    check_fp32(make_inputs(**shape))


@pytest.mark.parametrize("softplus", [True, False])
def test_without_optional_inputs(small_chunks, softplus):
    check_fp32(make_inputs(dim=3, seqlen=40, optional=False), softplus)


@pytest.mark.parametrize(
    "time_invariant,shape",
    [
        ("B", dict(dim=3, seqlen=40)),
        ("C", dict(dim=4, ngroups=2, dstate=5, seqlen=33)),
        ("BC", dict(seqlen=1)),
        ("BC", dict(batch=1, dim=3, seqlen=20, dstate=1)),
    ],
)
def test_time_invariant_B_C(small_chunks, time_invariant, shape):
    """(dim, dstate) B and / or C, as mamba_ssm takes them: read per channel, their gradients summed per channel."""
    check_fp32(make_inputs(time_invariant=time_invariant, **shape))


@pytest.mark.parametrize(
    "time_invariant,shape",
    [
        ("", dict(dim=3, seqlen=40)),
        ("B", dict(dim=4, ngroups=2, dstate=5, seqlen=33)),
        ("C", dict(seqlen=1)),
        ("BC", dict(batch=1, dim=3, seqlen=20, dstate=1)),
    ],
)
def test_complex_A(small_chunks, time_invariant, shape):
    """S4D-style complex A (mamba_ssm's layout): complex state, dA, time-invariant dB / dC and dinitial_state."""
    t = make_inputs(time_invariant=time_invariant, complex_A=True, **shape)
    y, last, grads = run(t, "triton")
    y_ref, last_ref, grads_ref = run(t, "reference")
    assert y.dtype == torch.float32 and last.dtype == torch.complex64
    assert_close(y, y_ref, torch.float32, msg="y")
    assert_close(as_real(last), as_real(last_ref), torch.float32, msg="last_state")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert grads[name].dtype == grads_ref[name].dtype and grads[name].shape == t[name].shape, name
        assert_close(as_real(grads[name]), as_real(grads_ref[name]), torch.float32, msg=name)


def test_complex_A_low_precision(small_chunks):
    t = make_inputs(dim=4, seqlen=40, dstate=8, dtype=torch.float16, time_invariant="B", complex_A=True)
    y, last, grads = run(t, "triton")
    y_lowp, last_lowp, grads_lowp = run(t, "reference")
    t64 = {k: v.to(torch.complex128 if v.is_complex() else torch.float64) for k, v in t.items()}
    y64, last64, grads64 = run(t64, "reference")
    assert_close_to_ref(y, y64, y_lowp, msg="y")
    assert_close_to_ref(as_real(last), as_real(last64), as_real(last_lowp), msg="last_state")
    for name in grads64:
        assert_close_to_ref(as_real(grads[name]), as_real(grads64[name]), as_real(grads_lowp[name]), msg=name)


def test_ungrouped_equals_one_group(kernels):
    t = make_inputs(dim=3, seqlen=20, dstate=4)
    grouped = {**t, "B": t["B"][:, None], "C": t["C"][:, None]}
    y, last, grads = run(t, "triton")
    y1, last1, grads1 = run(grouped, "triton")
    assert torch.equal(y, y1) and torch.equal(last, last1)
    assert torch.equal(grads["B"], grads1["B"][:, 0])


# The interpreter casts float32 to bfloat16 by truncation (the GPU rounds to nearest), which
# alone can double the error of y on some draws: the time-invariant case runs in float16.
@pytest.mark.parametrize("dtype,time_invariant", [(torch.bfloat16, ""), (torch.float16, ""), (torch.float16, "BC")])
def test_low_precision(small_chunks, dtype, time_invariant):
    """Error against the float64 reference at most twice that of the reference run on the same low-precision inputs."""
    t = make_inputs(dim=4, seqlen=40, dstate=8, dtype=dtype, time_invariant=time_invariant)
    y, last, grads = run(t, "triton")
    y_lowp, last_lowp, grads_lowp = run(t, "reference")
    y64, last64, grads64 = run({k: v.double() for k, v in t.items()}, "reference")
    assert y.dtype == dtype and last.dtype == torch.float32
    assert_close_to_ref(y, y64, y_lowp, msg="y")
    assert_close_to_ref(last, last64, last_lowp, msg="last_state")
    for name in grads64:
        assert grads[name].dtype == t[name].dtype, name
        assert_close_to_ref(grads[name], grads64[name], grads_lowp[name], msg=name)


def test_noncontiguous_inputs(small_chunks):
    t = make_inputs(dim=4, seqlen=24, dstate=4)
    t["u"] = t["u"].transpose(1, 2).contiguous().transpose(1, 2)
    t["B"] = t["B"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not t["u"].is_contiguous()
    check_fp32(t)


def test_noncontiguous_time_invariant_B_C(small_chunks):
    t = make_inputs(dim=4, seqlen=24, dstate=4, time_invariant="BC")
    t["B"] = t["B"].t().contiguous().t()  # dim fastest
    t["C"] = torch.randn(4, 8)[:, ::2]  # a stride of 2 along dstate
    assert not t["B"].is_contiguous() and not t["C"].is_contiguous()
    check_fp32(t)


def test_gradient_of_last_state_only(small_chunks):
    t = make_inputs(dim=3, seqlen=40, dstate=4)
    results = []
    for backend in ("triton", "reference"):
        leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
        _, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
        results.append(torch.autograd.grad(last.sum(), [leaves[k] for k in ("u", "delta", "A", "B", "initial_state")]))
    for g, g_ref in zip(*results):
        assert_close(g, g_ref, torch.float32)


def test_no_grad_forward(kernels):
    t = make_inputs(dim=3, seqlen=20, dstate=4)
    with torch.no_grad():
        y, last = selective_scan_fn(**t, delta_softplus=True, return_last_state=True, backend="triton")
    y_ref, last_ref = selective_scan_ref(**t, delta_softplus=True, return_last_state=True)
    assert_close(y, y_ref)
    assert_close(last, last_ref)


def test_float64_is_refused(kernels):
    t = {k: v.double() for k, v in make_inputs(dim=2, seqlen=4, dstate=2).items()}
    with pytest.raises(TypeError, match="float64"):
        selective_scan_fn(**t, backend="triton")


@pytest.mark.parametrize("time_invariant,complex_A", [("", False), ("B", False), ("C", True)])
def test_torch_compile_fullgraph(kernels, time_invariant, complex_A):
    t = make_inputs(dim=3, seqlen=12, dstate=4, time_invariant=time_invariant, complex_A=complex_A)

    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        y, last = selective_scan_fn(
            u, delta, A, B, C, D, z, delta_bias, True, True, initial_state=initial_state, backend="triton"
        )
        return (y * y).sum() + as_real(last).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [v.clone().requires_grad_(True) for v in t.values()]
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [v.clone().requires_grad_(True) for v in t.values()]
    expected = f(*ref_leaves)
    expected.backward()
    assert_close(out.detach(), expected.detach())
    for leaf, ref in zip(leaves, ref_leaves):
        assert_close(as_real(leaf.grad), as_real(ref.grad), torch.float32)


_GPU_CHECK = textwrap.dedent(
    """
    import torch
    from lnlm_ssm.ops import selective_scan_fn
    from lnlm_ssm.utils.testing import assert_close_to_ref

    torch.manual_seed(0)
    batch, dim, seqlen, dstate, ngroups = 2, 512, 2049, 16, 2
    f = dict(device="cuda", dtype=torch.bfloat16)
    t = dict(
        u=torch.randn(batch, dim, seqlen, **f), delta=0.5 * torch.randn(batch, dim, seqlen, **f),
        A=-torch.rand(dim, dstate, device="cuda") - 0.1, B=torch.randn(batch, ngroups, dstate, seqlen, **f),
        C=torch.randn(batch, ngroups, dstate, seqlen, **f), D=torch.randn(dim, device="cuda"),
        z=torch.randn(batch, dim, seqlen, **f), delta_bias=0.3 * torch.randn(dim, device="cuda"),
        initial_state=torch.randn(batch, dim, dstate, device="cuda"),
    )

    def run(t, backend):
        leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
        y, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
        g = torch.Generator(device="cuda").manual_seed(1)
        gy = torch.randn(y.shape, generator=g, device="cuda").to(y.dtype)
        last = torch.view_as_real(last) if last.is_complex() else last
        grads = torch.autograd.grad((y * gy).sum() + last.sum(), list(leaves.values()))
        return [y, last, *grads]

    ours = run(t, "triton")
    lowp = run(t, "reference")
    ref = run({k: v.double() for k, v in t.items()}, "reference")
    for name, a, r, l in zip(["y", "last_state", *t], ours, ref, lowp):
        assert_close_to_ref(a, r, l, msg=name)

    # Complex A with a time-invariant complex B and a time-varying C of (real, imaginary) pairs.
    dim, seqlen = 64, 1000
    cf = dict(device="cuda", dtype=torch.complex64)
    t = dict(
        u=torch.randn(batch, dim, seqlen, **f), delta=0.5 * torch.randn(batch, dim, seqlen, **f),
        A=torch.complex(-torch.rand(dim, dstate, device="cuda") - 0.1, torch.randn(dim, dstate, device="cuda")),
        B=torch.randn(dim, dstate, **cf), C=torch.randn(batch, dstate, 2 * seqlen, **f),
        D=torch.randn(dim, device="cuda"), z=torch.randn(batch, dim, seqlen, **f),
        delta_bias=0.3 * torch.randn(dim, device="cuda"), initial_state=torch.randn(batch, dim, dstate, **cf),
    )
    ours = [torch.view_as_real(x) if x.is_complex() else x for x in run(t, "triton")]
    lowp = [torch.view_as_real(x) if x.is_complex() else x for x in run(t, "reference")]
    t64 = {k: v.to(torch.complex128 if v.is_complex() else torch.float64) for k, v in t.items()}
    ref = [torch.view_as_real(x) if x.is_complex() else x for x in run(t64, "reference")]
    for name, a, r, l in zip(["y", "last_state", *t], ours, ref, lowp):
        assert_close_to_ref(a, r, l, msg="complex A: " + name)
    """
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_gpu_compiled_kernels_match_reference():
    """Big shapes on the GPU with compiled (not interpreted) kernels, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _GPU_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
