"""Public Mamba-1 selective scan: ``selective_scan_fn``, as in mamba_ssm."""

from __future__ import annotations

import torch

from lnlm_ssm.ops._backends import BACKENDS, register, resolve
from lnlm_ssm.ops._checks import Shapes, check_divisible, check_tensor
from lnlm_ssm.ops.selective_scan.reference import selective_scan_ref

_KERNELS = {
    "reference": selective_scan_ref,
    "cpu": "lnlm_ssm.ops.selective_scan.cpu:selective_scan_cpu",
    "triton": "lnlm_ssm.ops.selective_scan.triton:selective_scan_triton",
    "cuda": "lnlm_ssm.ops.selective_scan.cuda:selective_scan_cuda",
}
register("selective_scan", _KERNELS)


_COMPLEX_DTYPES = (torch.complex64, torch.complex128)

# The backends with a kernel for complex A: "auto" skips the others, and asking for one of them says so.
_COMPLEX_BACKENDS = ("reference", "cpu", "triton")
_COMPLEX_UNSERVED = tuple(
    (backend, f"complex A is served by the {', '.join(map(repr, _COMPLEX_BACKENDS))} backends only")
    for backend in BACKENDS
    if backend not in _COMPLEX_BACKENDS
)


def _bind_complex_or_real(shapes: Shapes, arg: str, value, layout, complex_A: bool) -> None:
    """Bind a tensor that is complex exactly when A is: A itself, a time-invariant B or C, initial_state."""
    if isinstance(value, torch.Tensor) and value.is_complex():
        if not complex_A:
            raise TypeError(f"{arg} must be real when A is real, got {value.dtype}")
        if value.dtype not in _COMPLEX_DTYPES:
            raise TypeError(f"{arg} must have dtype complex64 or complex128, got {value.dtype}")
        # The real view has the tensor's shape and device: Shapes checks those.
        shapes.bind(arg, value.real, layout)
        return
    if complex_A and isinstance(value, torch.Tensor):
        raise TypeError(f"{arg} must be complex ({', '.join(layout)}) when A is complex, got {value.dtype}")
    shapes.bind(arg, value, layout)


def _bind_projection(shapes: Shapes, arg: str, value, complex_A: bool) -> int | None:
    """Bind B or C; return its number of groups (1 when 3-D), or None when it is time-invariant."""
    if not (isinstance(value, torch.Tensor) and value.is_complex()):
        check_tensor(arg, value)
    if value.ndim == 2:
        _bind_complex_or_real(shapes, arg, value, ("dim", "dstate"), complex_A)
        return None
    if value.ndim not in (3, 4):
        raise ValueError(
            f"{arg} must have 2 dimensions (dim, dstate), 3 (batch, dstate, seqlen) or 4 "
            f"(batch, ngroups, dstate, seqlen), got shape {tuple(value.shape)}"
        )
    if value.is_complex():
        raise TypeError(
            f"{arg} must be real when time-varying: with complex A its last dimension holds "
            f"(real, imaginary) pairs, got {value.dtype}"
        )
    seqlen = shapes["seqlen"]
    if complex_A and value.shape[-1] != 2 * seqlen:
        raise ValueError(
            f"{arg} must have 2 * seqlen = {2 * seqlen} entries in its last dimension when A is complex "
            f"((real, imaginary) pairs), got shape {tuple(value.shape)}"
        )
    steps = 2 * seqlen if complex_A else "seqlen"
    if value.ndim == 4:
        shapes.bind(arg, value, ("batch", "ngroups", "dstate", steps))
        return value.shape[1]
    shapes.bind(arg, value, ("batch", "dstate", steps))
    return 1


def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state) -> Shapes:
    shapes = Shapes()
    seq = ("batch", "dim", "seqlen")
    shapes.bind("u", u, seq)
    shapes.bind("delta", delta, seq)
    shapes.bind_optional("z", z, seq)
    complex_A = isinstance(A, torch.Tensor) and A.is_complex()
    _bind_complex_or_real(shapes, "A", A, ("dim", "dstate"), complex_A)
    groups_B = _bind_projection(shapes, "B", B, complex_A)
    groups_C = _bind_projection(shapes, "C", C, complex_A)
    if groups_B is not None and groups_C is not None:
        if groups_B != groups_C:
            raise ValueError(
                f"B and C must have the same number of groups (a 3-D one has 1), got B {tuple(B.shape)}, "
                f"C {tuple(C.shape)}"
            )
        if C.dtype != B.dtype:
            raise TypeError(f"C must have the dtype of B ({B.dtype}), got {C.dtype}")
    # Only time-varying B and C are grouped.
    ngroups = groups_B if groups_B is not None else (groups_C if groups_C is not None else 1)
    check_divisible("dim", shapes["dim"], "ngroups", ngroups)
    shapes.bind_optional("D", D, ("dim",))
    shapes.bind_optional("delta_bias", delta_bias, ("dim",))
    if initial_state is not None:
        _bind_complex_or_real(shapes, "initial_state", initial_state, ("batch", "dim", "dstate"), complex_A)
    for arg, value in (("delta", delta), ("z", z)):
        if value is not None and value.dtype != u.dtype:
            raise TypeError(f"{arg} must have the dtype of u ({u.dtype}), got {value.dtype}")
    return shapes


def selective_scan_fn(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    initial_state=None,
    backend="auto",
):
    """Mamba-1 selective scan.

    Shapes and math: see ``lnlm_ssm/ops/selective_scan/reference.py``. B and C
    are each time-varying (3-D or grouped 4-D; both grouped alike when both
    are) or time-invariant ``(dim, dstate)``. A may be complex (S4D-style), on
    the "reference", "cpu" and "triton" backends. Returns y ``(batch, dim, seqlen)`` in u's
    dtype, or ``(y, last_state)`` with ``last_state`` ``(batch, dim, dstate)`` in
    fp32 (float64 for float64 u; complex64 / complex128 for complex A). Unlike
    mamba_ssm, gradients flow through ``last_state`` and into ``initial_state``.
    """
    shapes = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    unserved = _COMPLEX_UNSERVED if A.is_complex() else ()
    kernel = resolve("selective_scan", backend, shapes.device, dtype=u.dtype, unserved=unserved)
    return kernel(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state=initial_state
    )
