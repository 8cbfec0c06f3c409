"""The one place that knows which backends are built and picks one for a call.

Backends:

- ``"reference"``: pure PyTorch, always present, any device. The specification.
- ``"cpu"``: the C++ extension ``lnlm_ssm._C`` (built by ``pip install``), CPU tensors.
- ``"triton"``: Triton kernels, CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).
- ``"cuda"``: the CUDA extension ``lnlm_ssm._cuda``, CUDA tensors.

``backend="auto"`` takes the first backend in :data:`AUTO_ORDER` for the
tensors' device that is usable and has a kernel for the op. Each op lists its
kernels in its ``interface.py`` and declares them with :func:`register`; an op
that has only a reference resolves to it. An explicit backend that cannot serve the call raises
:class:`BackendUnavailableError` saying why and how to get it: there is no
silent fallback.
"""

from __future__ import annotations

import functools
import importlib
import os
import types
from typing import Callable, Mapping, Union

import torch

from lnlm_ssm.utils.checks import check_choice

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Fastest first, per device type. Changes here must be backed by a measurement
# in benchmarks/results/.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

# float64 inputs ask for float64 math, which only these backends do; "auto" skips the others.
FLOAT64_BACKENDS = ("reference", "cpu")

_INSTALL_HINT = "reinstall from the repository root with `pip install --no-build-isolation -v -e .`"

# A kernel is either the callable itself or "module:attribute", imported on first use
# so that importing lnlm_ssm never imports Triton or loads an extension.
Kernel = Union[Callable, str]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def _load_extension(module: str):
    try:
        return importlib.import_module(module), ""
    except ImportError as exc:
        return None, f"the extension {module} is not built or failed to load ({exc})"


@functools.lru_cache(maxsize=None)
def _probe(backend: str) -> str:
    """Return "" when ``backend`` is usable on this machine, else the reason it is not."""
    if backend == "reference":
        return ""
    if backend == "cpu":
        _, reason = _load_extension("lnlm_ssm._C")
        return f"{reason}; {_INSTALL_HINT}" if reason else ""
    if backend == "triton":
        try:
            importlib.import_module("triton")
        except ImportError as exc:
            return f"triton is not importable ({exc}); pip install triton"
        if not (torch.cuda.is_available() or _triton_interpreted()):
            return "Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 to run them slowly on the CPU)"
        return ""
    if backend == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
        _, reason = _load_extension("lnlm_ssm._cuda")
        if reason:
            return (
                f"{reason}; it is built only with a CUDA build of torch and nvcc present: "
                f"set LNLM_SSM_CUDA=1 and {_INSTALL_HINT}"
            )
        return ""
    check_choice("backend", backend, BACKENDS)  # raises: only "auto" is left, and it is never probed
    return ""


def check_backend(backend) -> str:
    """``backend`` is "auto" or one of :data:`BACKENDS`: the check every layer and model makes at construction."""
    return check_choice("backend", backend, ("auto",) + BACKENDS)


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> tuple[str, ...]:
    """The backends built and usable on this machine, e.g. ``("reference", "cpu")``."""
    return tuple(b for b in BACKENDS if not _probe(b))


def backend_report() -> dict[str, str]:
    """Each backend mapped to "available" or the reason it is not."""
    return {b: (_probe(b) or "available") for b in BACKENDS}


def _serves_device(backend: str, device_type: str) -> bool:
    if backend == "reference":
        return True
    if backend == "cpu":
        return device_type == "cpu"
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and _triton_interpreted())
    return device_type == "cuda"


def _materialise(kernel: Kernel) -> Callable:
    if callable(kernel):
        return kernel
    module, attr = kernel.split(":")
    return getattr(importlib.import_module(module), attr)


# Every op's kernels, by op name (filled by register()), and the kernels picked
# so far, by the key _pick() returns.
_KERNELS: dict[str, Mapping[str, Kernel]] = {}
# A namespace rather than a dict: under torch.compile, _pick adds kernels while a
# function is being traced, and the tracer snapshots a dict's items on first use
# (a second op picked in the same function would then be missing), whereas it
# reads an object's attributes when they are accessed.
_PICKED = types.SimpleNamespace()


def register(op: str, kernels: Mapping[str, Kernel]) -> None:
    """Declare ``op``'s kernels: backend name -> callable or "module:attribute". "reference" is required."""
    _KERNELS[op] = kernels


def backend_for(op: str, backend: str) -> str:
    """``backend`` when ``op`` has a kernel for it, else "auto".

    For modules that take one ``backend`` for all the ops they call: naming
    "cpu" there means "the cpu kernels where they exist", so an op that has
    none (the norms run only their PyTorch kernel on CPU) goes by "auto"
    rather than failing the whole model.
    """
    return backend if backend == "auto" or backend in _KERNELS[op] else "auto"


def resolve(
    op: str,
    backend: str,
    device: torch.device,
    dtype: torch.dtype | None = None,
    unserved: tuple[tuple[str, str], ...] = (),
) -> Callable:
    """The kernel of ``op`` for ``backend`` on ``device``; ``dtype`` is the dtype of the op's main input.

    ``unserved``: (backend, reason) pairs for the kernels that cannot serve this
    call's inputs (say, a form of an argument they do not implement): "auto"
    passes them over, and asking for one raises with the reason.
    """
    return getattr(_PICKED, _pick(op, backend, device.type, dtype, unserved))


def _pick(
    op: str, backend: str, device_type: str, dtype: torch.dtype | None, unserved: tuple[tuple[str, str], ...]
) -> str:
    kernels = _KERNELS[op]
    refused = dict(unserved)
    if backend == "auto":
        chosen = "reference"
        for candidate in AUTO_ORDER.get(device_type, ()):
            if (dtype == torch.float64 and candidate not in FLOAT64_BACKENDS) or candidate in refused:
                continue
            if candidate in kernels and not _probe(candidate) and _serves_device(candidate, device_type):
                chosen = candidate
                break
    else:
        check_backend(backend)
        reason = _probe(backend)
        if reason:
            raise BackendUnavailableError(f"{op}: backend {backend!r} is not available: {reason}")
        if backend not in kernels:
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} has no kernel for this op yet; "
                f"this op has: {', '.join(sorted(kernels))}"
            )
        if not _serves_device(backend, device_type):
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} cannot run on {device_type} tensors; "
                "move the tensors or pick another backend"
            )
        if backend in refused:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot serve this call: {refused[backend]}")
        chosen = backend
    key = f"{op}:{chosen}"
    if not hasattr(_PICKED, key):
        setattr(_PICKED, key, _materialise(kernels[chosen]))
    return key


# torch.compile runs _pick at trace time instead of tracing it (it probes
# extensions and imports kernel modules): its inputs and result are constants.
# This is what torch.compiler.assume_constant_result does, minus its import of
# torch._dynamo (and with it Triton), which would add seconds to `import lnlm_ssm`;
# tests/ops/test_backends.py checks that the decorator still sets this attribute.
_pick._dynamo_marked_constant = True
