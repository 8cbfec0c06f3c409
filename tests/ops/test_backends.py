"""Backend selection: what is reported, what "auto" picks, and errors for unusable backends."""

import pytest
import torch

import lnlm_ssm.ops as ops
from lnlm_ssm.ops import BackendUnavailableError, available_backends, backend_report, selective_scan_fn
from lnlm_ssm.ops._backends import register, resolve


def test_reference_always_available():
    assert "reference" in available_backends()
    report = backend_report()
    assert set(report) == {"reference", "cpu", "triton", "cuda"}
    assert report["reference"] == "available"
    for name, status in report.items():
        assert (status == "available") == (name in available_backends())


def resolve_new(op, backend, device, kernels):
    """Register a test op under its own name, then resolve it."""
    register(op, kernels)
    return resolve(op, backend, device)


def test_auto_falls_back_to_reference_when_op_has_no_kernel():
    kernels = {"reference": lambda: "ref"}
    assert resolve_new("only-reference", "auto", torch.device("cpu"), kernels)() == "ref"


def test_auto_prefers_built_cpu_kernel():
    kernels = {"reference": lambda: "ref", "cpu": lambda: "cpu"}
    expected = "cpu" if "cpu" in available_backends() else "ref"
    assert resolve_new("with-cpu", "auto", torch.device("cpu"), kernels)() == expected


def test_unknown_backend_is_a_value_error():
    u = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'cpu', 'triton', 'cuda'\), got 'fast'"):
        selective_scan_fn(u, u, -torch.rand(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3), backend="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backend_without_gpu_explains(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops._backends._probe.cache_clear()
    u = torch.randn(1, 2, 3)
    with pytest.raises(BackendUnavailableError, match=rf"selective_scan: backend '{backend}' is not available: .*(CUDA GPU|torch.cuda)"):
        selective_scan_fn(u, u, -torch.rand(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3), backend=backend)
    ops._backends._probe.cache_clear()


def test_backend_without_kernel_for_op_says_which_exist():
    kernels = {"reference": lambda: "ref"}
    if "cpu" in available_backends():
        expected = r"no-cpu: backend 'cpu' has no kernel for this op yet; this op has: reference"
    else:
        expected = r"no-cpu: backend 'cpu' is not available: .*pip install --no-build-isolation"
    with pytest.raises(BackendUnavailableError, match=expected):
        resolve_new("no-cpu", "cpu", torch.device("cpu"), kernels)


@pytest.mark.skipif("cpu" not in available_backends(), reason="needs the C++ extension")
def test_backend_on_wrong_device_says_so():
    kernels = {"reference": lambda: "ref", "cpu": lambda: "cpu"}
    with pytest.raises(BackendUnavailableError, match=r"on-meta: backend 'cpu' cannot run on meta tensors"):
        resolve_new("on-meta", "cpu", torch.device("meta"), kernels)


def test_unserved_inputs_are_passed_over_by_auto_and_refused_when_asked_for():
    register("partial-cpu", {"reference": lambda: "ref", "cpu": lambda: "cpu"})
    unserved = (("cpu", "the cpu kernel has no complex form"),)
    cpu = torch.device("cpu")
    assert resolve("partial-cpu", "auto", cpu, unserved=unserved)() == "ref"
    if "cpu" in available_backends():
        assert resolve("partial-cpu", "auto", cpu)() == "cpu"
        expected = "partial-cpu: backend 'cpu' cannot serve this call: the cpu kernel has no complex form"
        with pytest.raises(BackendUnavailableError, match=expected):
            resolve("partial-cpu", "cpu", cpu, unserved=unserved)


def test_explicit_reference_matches_auto():
    u = torch.randn(1, 2, 3)
    args = (u, u.abs(), -torch.rand(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3))
    torch.testing.assert_close(selective_scan_fn(*args, backend="reference"), selective_scan_fn(*args))


def test_pick_is_marked_constant_for_torch_compile():
    """_pick is marked by hand the way torch.compiler.assume_constant_result marks a function."""
    from lnlm_ssm.ops import _backends

    marked = torch.compiler.assume_constant_result(lambda: None)
    assert marked._dynamo_marked_constant is True
    assert _backends._pick._dynamo_marked_constant is True


def test_import_stays_light():
    """`import lnlm_ssm` loads neither Triton nor torch._dynamo (seconds of import time)."""
    import subprocess
    import sys

    code = "import sys, lnlm_ssm, lnlm_ssm.ops; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_two_ops_first_picked_inside_one_compiled_function():
    """Kernels picked for the first time while torch.compile traces are all found (no stale view of them)."""
    register("_test_add_one", {"reference": lambda x: x + 1})
    register("_test_double", {"reference": lambda x: x * 2})

    def f(x):
        return resolve("_test_add_one", "auto", x.device)(x) + resolve("_test_double", "auto", x.device)(x)

    x = torch.arange(3.0)
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), x + 1 + x * 2)
