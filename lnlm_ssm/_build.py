"""Build decisions for ``setup.py``: what to compile, with which flags, and why.

This module is pure Python and imports neither torch nor the rest of the
package: ``setup.py`` loads it by file path, before anything is built, and the
tests call it with made-up environments.

Environment variables read here:

``LNLM_SSM_CUDA``        ``auto`` (default), ``0`` or ``1``. ``auto`` builds the CUDA
                         extension ``lnlm_ssm._cuda`` when torch is a CUDA build, nvcc is
                         found and there are CUDA sources; ``0`` never builds it; ``1``
                         requires it and fails with the reason when it cannot be built.
``LNLM_SSM_CUDA_ARCHS``  compute capabilities to compile for, as ``"8.0;9.0"`` (``;``, ``,``
                         or spaces between them; each ``major.minor`` with an optional
                         ``a``/``f`` suffix and ``+PTX``). Default: ``TORCH_CUDA_ARCH_LIST``
                         when set (same form), else the visible GPUs' capabilities, else
                         :data:`DEFAULT_CUDA_ARCHS`.
``LNLM_SSM_PORTABLE``    ``1`` leaves out ``-march=native`` (for binaries that must run
                         on other CPUs); default ``0``.
``MAX_JOBS``             parallel compile jobs; default: the number of CPUs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

CPU_EXTENSION = "lnlm_ssm._C"
CUDA_EXTENSION = "lnlm_ssm._cuda"
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")
ARCHS_EXAMPLE = '"8.0;9.0"'

_ARCH = re.compile(r"^\d+\.\d+[af]?(\+PTX)?$")


class BuildConfigError(ValueError):
    """An environment variable has a bad value, or asks for a build that cannot be done."""


@dataclass(frozen=True)
class CudaDecision:
    build: bool
    archs: tuple[str, ...]  # empty when not building
    reason: str  # why it is (not) built, for the one-line summary

    @property
    def arch_list(self) -> str:
        """The archs as TORCH_CUDA_ARCH_LIST wants them: ``"8.0;9.0"``."""
        return ";".join(self.archs)


def _flag(env: Mapping[str, str], name: str, default: str, allowed: Sequence[str]) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in allowed:
        raise BuildConfigError(f"{name} must be one of {', '.join(allowed)}; got {env.get(name)!r}")
    return value


def cuda_mode(env: Mapping[str, str]) -> str:
    """``"auto"``, ``"0"`` or ``"1"`` from ``LNLM_SSM_CUDA``."""
    return _flag(env, "LNLM_SSM_CUDA", "auto", ("auto", "0", "1"))


def portable(env: Mapping[str, str]) -> bool:
    return _flag(env, "LNLM_SSM_PORTABLE", "0", ("0", "1")) == "1"


def parse_archs(text: str, source: str = "LNLM_SSM_CUDA_ARCHS") -> tuple[str, ...]:
    """``"8.0;9.0+PTX"`` -> ``("8.0", "9.0+PTX")``; a malformed entry raises naming ``source``."""
    items = [item for item in re.split(r"[;,\s]+", text.strip()) if item]
    if not items:
        raise BuildConfigError(f"{source} is empty; expected a list of compute capabilities like {ARCHS_EXAMPLE}")
    for item in items:
        if not _ARCH.match(item):
            raise BuildConfigError(
                f"{source}: {item!r} is not a compute capability; expected a list like {ARCHS_EXAMPLE} "
                "(major.minor, optionally followed by a or f and +PTX, e.g. 9.0a or 8.0+PTX)"
            )
    return tuple(dict.fromkeys(items))


def _sort_archs(archs: Sequence[str]) -> tuple[str, ...]:
    def key(arch: str):
        major, minor = re.match(r"(\d+)\.(\d+)", arch).groups()
        return int(major), int(minor), arch

    return tuple(sorted(dict.fromkeys(archs), key=key))


def resolve_archs(env: Mapping[str, str], local_archs: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """The archs to build for, and where they came from."""
    if env.get("LNLM_SSM_CUDA_ARCHS", "").strip():
        return parse_archs(env["LNLM_SSM_CUDA_ARCHS"]), "LNLM_SSM_CUDA_ARCHS"
    if env.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return parse_archs(env["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST"), "TORCH_CUDA_ARCH_LIST"
    if local_archs:
        return _sort_archs(parse_archs(";".join(local_archs), "the visible GPUs' compute capability")), "visible GPUs"
    return DEFAULT_CUDA_ARCHS, "default, no GPU visible"


def decide_cuda_build(
    env: Mapping[str, str],
    torch_cuda_version: Optional[str],
    nvcc_path: Optional[str],
    local_archs: Sequence[str],
    have_sources: bool,
    torch_version: str = "",
) -> CudaDecision:
    """Whether to build ``lnlm_ssm._cuda``, for which archs, and why.

    ``torch_cuda_version`` is ``torch.version.cuda`` (None for a CPU build),
    ``nvcc_path`` the nvcc found (None if none), ``local_archs`` the visible
    GPUs' capabilities as ``"8.0"`` strings, ``have_sources`` whether
    ``csrc/cuda`` holds any ``.cu`` file. Raises :class:`BuildConfigError` for a
    bad environment value, or for ``LNLM_SSM_CUDA=1`` when the build cannot be done.
    """
    mode = cuda_mode(env)
    if env.get("LNLM_SSM_CUDA_ARCHS", "").strip():
        parse_archs(env["LNLM_SSM_CUDA_ARCHS"])  # a bad value is an error even when it goes unused
    if mode == "0":
        return CudaDecision(False, (), "LNLM_SSM_CUDA=0")

    torch_name = f"torch {torch_version}".strip()
    blockers = []
    if torch_cuda_version is None:
        blockers.append(f"{torch_name} is a CPU build (torch.version.cuda is None)")
    if not nvcc_path:
        blockers.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if not have_sources:
        blockers.append("there are no CUDA sources (csrc/cuda/**/*.cu)")
    if blockers:
        if mode == "1":
            raise BuildConfigError(
                "LNLM_SSM_CUDA=1 asks for the CUDA extension, but " + "; and ".join(blockers)
                + ". Install a CUDA build of torch and the CUDA toolkit, or set LNLM_SSM_CUDA=auto (or 0) "
                "to build the CPU extension alone."
            )
        return CudaDecision(False, (), blockers[0])

    archs, source = resolve_archs(env, local_archs)
    why = "LNLM_SSM_CUDA=1" if mode == "1" else f"{torch_name} has CUDA {torch_cuda_version} and nvcc is at {nvcc_path}"
    return CudaDecision(True, archs, f"{why}; archs {';'.join(archs)} ({source})")


def max_jobs(env: Mapping[str, str], cpu_count: Optional[int]) -> int:
    """Parallel compile jobs: ``MAX_JOBS`` when set, else the CPU count."""
    value = env.get("MAX_JOBS", "").strip()
    if not value:
        return max(1, cpu_count or 1)
    if not value.isdigit() or int(value) < 1:
        raise BuildConfigError(f"MAX_JOBS must be a positive integer; got {value!r}")
    return int(value)


def cxx_flags(env: Mapping[str, str]) -> list[str]:
    """Compiler flags for the C++ CPU extension (OpenMP is also a link flag: :func:`cxx_link_flags`)."""
    # As torch itself is built: no errno from libm calls, no trapping FP (lets loops with
    # selects vectorise). Neither changes results, unlike -ffast-math, which is not used.
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if not portable(env):
        # gcc keeps to 256-bit vectors by default even where AVX-512 exists; the scans'
        # inner loops measured 1.2x faster with 512 (ignored on CPUs without it).
        flags += ["-march=native", "-mprefer-vector-width=512"]
    return flags


def cxx_link_flags() -> list[str]:
    return ["-fopenmp"]


def nvcc_flags() -> list[str]:
    """nvcc flags for the CUDA extension. No --use_fast_math: accuracy matters more here.

    The -U flags undo torch's defaults that hide the half/bfloat16 operators, which
    kernels written against cuda_fp16.h / cuda_bf16.h use.
    """
    return [
        "-O3",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "--threads",
        "4",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT162_OPERATORS__",
        "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    ]


def summary(cuda: CudaDecision, env: Mapping[str, str]) -> str:
    """The one line setup.py prints to stderr about what it builds and why."""
    cpu = f"building CPU extension {CPU_EXTENSION}" + (" (portable: no -march=native)" if portable(env) else "")
    if cuda.build:
        return f"lnlm_ssm: {cpu} and CUDA extension {CUDA_EXTENSION}: {cuda.reason}"
    return f"lnlm_ssm: {cpu}; CUDA extension skipped: {cuda.reason}"
