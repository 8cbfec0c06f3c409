"""The build: setup.py's decisions (lnlm_ssm/_build.py), its failure messages, and the built CPU extension."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lnlm_ssm import _build
from lnlm_ssm._build import BuildConfigError, decide_cuda_build

ROOT = Path(__file__).resolve().parents[1]
NVCC = "/usr/local/cuda/bin/nvcc"
SCHEMA = (
    "lnlm_ssm::selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
    "Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices=None) -> Tensor"
)


def decide(env=None, cuda="12.8", nvcc=NVCC, archs=(), sources=True):
    return decide_cuda_build(env or {}, cuda, nvcc, list(archs), sources, torch_version="2.13.0")


# ---------------------------------------------------------------- decide_cuda_build


@pytest.mark.parametrize("mode", [{}, {"LNLM_SSM_CUDA": "auto"}, {"LNLM_SSM_CUDA": "AUTO"}, {"LNLM_SSM_CUDA": ""}])
def test_auto_builds_when_everything_is_there(mode):
    d = decide(mode, archs=["8.6"])
    assert d.build and d.archs == ("8.6",)
    assert "CUDA 12.8" in d.reason and NVCC in d.reason


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"cuda": None}, "torch 2.13.0 is a CPU build"),
        ({"nvcc": None}, "nvcc was not found"),
        ({"sources": False}, "no CUDA sources"),
    ],
)
def test_auto_skips_with_the_reason(kwargs, reason):
    d = decide(**kwargs)
    assert not d.build and d.archs == ()
    assert reason in d.reason


def test_auto_gives_the_first_reason_when_several_apply():
    d = decide(cuda=None, nvcc=None, sources=False)
    assert not d.build and "CPU build" in d.reason


def test_zero_never_builds():
    assert decide({"LNLM_SSM_CUDA": "0"}) == _build.CudaDecision(False, (), "LNLM_SSM_CUDA=0")
    assert not decide({"LNLM_SSM_CUDA": "0"}, cuda=None, nvcc=None, sources=False).build


def test_one_builds_when_it_can():
    d = decide({"LNLM_SSM_CUDA": "1"})
    assert d.build and d.archs == _build.DEFAULT_CUDA_ARCHS and "LNLM_SSM_CUDA=1" in d.reason


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"cuda": None}, ["torch 2.13.0 is a CPU build", "CUDA build of torch"]),
        ({"nvcc": None}, ["nvcc was not found", "CUDA_HOME"]),
        ({"sources": False}, ["no CUDA sources"]),
        ({"cuda": None, "nvcc": None}, ["CPU build", "nvcc was not found"]),
    ],
)
def test_one_fails_clearly_when_it_cannot(kwargs, words):
    with pytest.raises(BuildConfigError) as info:
        decide({"LNLM_SSM_CUDA": "1"}, **kwargs)
    message = str(info.value)
    assert "LNLM_SSM_CUDA=1" in message and "LNLM_SSM_CUDA=auto" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("value", ["yes", "2", "true", "cuda"])
def test_bad_mode_is_an_error(value):
    with pytest.raises(BuildConfigError, match="LNLM_SSM_CUDA must be one of auto, 0, 1"):
        decide({"LNLM_SSM_CUDA": value})


# ---------------------------------------------------------------- archs


@pytest.mark.parametrize(
    "text, archs",
    [
        ("8.0;9.0", ("8.0", "9.0")),
        ("8.0, 9.0", ("8.0", "9.0")),
        ("7.5 8.6 8.6", ("7.5", "8.6")),
        ("9.0a;10.0f;12.0+PTX", ("9.0a", "10.0f", "12.0+PTX")),
        (" 8.9 ", ("8.9",)),
    ],
)
def test_arch_lists_parse(text, archs):
    assert _build.parse_archs(text) == archs
    assert decide({"LNLM_SSM_CUDA_ARCHS": text}, archs=["7.0"]).archs == archs


@pytest.mark.parametrize("text", ["sm80", "sm_80", "80", "8", "8.0.1", "compute_90", "9.0+ptx", "8.0;sm90"])
def test_malformed_arch_is_an_error_that_shows_the_expected_form(text):
    with pytest.raises(BuildConfigError) as info:
        decide({"LNLM_SSM_CUDA_ARCHS": text})
    assert "LNLM_SSM_CUDA_ARCHS" in str(info.value) and '"8.0;9.0"' in str(info.value)


def test_malformed_arch_is_an_error_even_when_cuda_is_skipped():
    with pytest.raises(BuildConfigError, match="sm80"):
        decide({"LNLM_SSM_CUDA_ARCHS": "sm80"}, cuda=None)


def test_empty_arch_list_is_an_error():
    with pytest.raises(BuildConfigError, match="empty"):
        _build.parse_archs(" ; ")


def test_arch_defaults():
    assert decide(archs=[]).archs == ("8.0", "9.0")
    assert "no GPU visible" in decide(archs=[]).reason
    # The visible GPUs, sorted numerically and without repeats.
    assert decide(archs=["9.0", "8.6", "10.0", "8.6"]).archs == ("8.6", "9.0", "10.0")
    assert decide({"TORCH_CUDA_ARCH_LIST": "7.5;8.0+PTX"}, archs=["9.0"]).archs == ("7.5", "8.0+PTX")
    assert decide({"LNLM_SSM_CUDA_ARCHS": "9.0", "TORCH_CUDA_ARCH_LIST": "8.0"}, archs=["8.6"]).archs == ("9.0",)
    assert decide({"LNLM_SSM_CUDA_ARCHS": "8.0;9.0a"}).arch_list == "8.0;9.0a"


def test_bad_torch_arch_list_names_it():
    with pytest.raises(BuildConfigError, match="TORCH_CUDA_ARCH_LIST"):
        decide({"TORCH_CUDA_ARCH_LIST": "Ampere"})


# ---------------------------------------------------------------- flags, jobs, summary


def test_cxx_flags():
    flags = _build.cxx_flags({})
    assert {"-O3", "-fopenmp", "-march=native"} <= set(flags)
    assert "-ffast-math" not in flags
    assert "-march=native" not in _build.cxx_flags({"LNLM_SSM_PORTABLE": "1"})
    assert "-march=native" in _build.cxx_flags({"LNLM_SSM_PORTABLE": "0"})
    assert _build.cxx_link_flags() == ["-fopenmp"]
    with pytest.raises(BuildConfigError, match="LNLM_SSM_PORTABLE"):
        _build.cxx_flags({"LNLM_SSM_PORTABLE": "yes"})


def test_nvcc_flags():
    flags = _build.nvcc_flags()
    assert {"-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"} <= set(flags)
    assert flags[flags.index("--threads") + 1] == "4"
    assert not any("fast_math" in f or "fast-math" in f for f in flags)


def test_max_jobs():
    assert _build.max_jobs({}, 16) == 16
    assert _build.max_jobs({}, None) == 1
    assert _build.max_jobs({"MAX_JOBS": "3"}, 16) == 3
    for bad in ("0", "-1", "many"):
        with pytest.raises(BuildConfigError, match="MAX_JOBS"):
            _build.max_jobs({"MAX_JOBS": bad}, 16)


def test_summary_is_one_line_that_says_what_and_why():
    skipped = _build.summary(decide(cuda=None), {})
    assert skipped == (
        "lnlm_ssm: building CPU extension lnlm_ssm._C; "
        "CUDA extension skipped: torch 2.13.0 is a CPU build (torch.version.cuda is None)"
    )
    built = _build.summary(decide({"LNLM_SSM_CUDA_ARCHS": "9.0"}), {"LNLM_SSM_PORTABLE": "1"})
    assert built.startswith("lnlm_ssm: building CPU extension lnlm_ssm._C (portable")
    assert "CUDA extension lnlm_ssm._cuda" in built and "9.0" in built
    assert "\n" not in skipped + built


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_build_rules_load_without_torch_or_the_package():
    result = _python(
        """
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("rules", "lnlm_ssm/_build.py")
        rules = importlib.util.module_from_spec(spec)
        sys.modules["rules"] = rules
        spec.loader.exec_module(rules)
        assert "torch" not in sys.modules and "lnlm_ssm" not in sys.modules, sorted(sys.modules)
        print(rules.decide_cuda_build({}, None, None, [], False).reason)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "CPU build" in result.stdout


# ---------------------------------------------------------------- setup.py's failures


def test_setup_without_torch_says_how_to_install(tmp_path):
    # A torch that cannot be imported, first on the path.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "pip install torch==2.13.0" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the refusal on a CPU build of torch")
def test_setup_refuses_forced_cuda_on_a_cpu_torch():
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=ROOT,
        env={**os.environ, "LNLM_SSM_CUDA": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "LNLM_SSM_CUDA=1" in result.stderr and "is a CPU build" in result.stderr


# ---------------------------------------------------------------- the built extension


def test_cpu_extension_imports_and_registers_the_op():
    import lnlm_ssm._C  # noqa: F401  (ImportError here: the package was installed without building)

    from lnlm_ssm.ops import available_backends

    op = torch.ops.lnlm_ssm.selective_state_update.default
    assert str(op._schema) == SCHEMA
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
    assert "cpu" in available_backends()


def test_fake_kernel_is_registered():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lnlm_ssm.ops import _library

    ops = _library.load()
    with FakeTensorMode():
        state = torch.empty(2, 3, 4, 5)
        x = torch.empty(2, 3, 4, dtype=torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
        y = ops.selective_state_update(
            state, x, x, torch.empty(3, 4, 5), torch.empty(2, 1, 5), torch.empty(2, 1, 5), None, None, None, True
        )
    assert y.shape == (2, 3, 4) and y.dtype == torch.bfloat16 and y.is_contiguous()
