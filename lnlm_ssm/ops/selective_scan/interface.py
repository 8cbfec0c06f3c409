"""Public Mamba-1 selective scan: ``selective_scan_fn``, as in mamba_ssm."""

from __future__ import annotations

from lnlm_ssm.ops._backends import register, resolve
from lnlm_ssm.ops._checks import Shapes, check_divisible
from lnlm_ssm.ops.selective_scan.reference import selective_scan_ref

_KERNELS = {
    "reference": selective_scan_ref,
    "cpu": "lnlm_ssm.ops.selective_scan.cpu:selective_scan_cpu",
    "triton": "lnlm_ssm.ops.selective_scan.triton:selective_scan_triton",
    "cuda": "lnlm_ssm.ops.selective_scan.cuda:selective_scan_cuda",
}
register("selective_scan", _KERNELS)


def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state) -> Shapes:
    shapes = Shapes()
    seq = ("batch", "dim", "seqlen")
    shapes.bind("u", u, seq)
    shapes.bind("delta", delta, seq)
    shapes.bind_optional("z", z, seq)
    shapes.bind("A", A, ("dim", "dstate"))
    if A.is_complex():
        raise TypeError("A must be real; complex A is not supported")
    for arg, value in (("B", B), ("C", C)):
        if getattr(value, "ndim", None) == 4:
            shapes.bind(arg, value, ("batch", "ngroups", "dstate", "seqlen"))
        else:
            shapes.bind(arg, value, ("batch", "dstate", "seqlen"))
    if B.ndim != C.ndim:
        raise ValueError(f"B and C must both be grouped (4-D) or both not (3-D), got B {tuple(B.shape)}, C {tuple(C.shape)}")
    if "ngroups" in shapes.sizes:
        check_divisible("dim", shapes["dim"], "ngroups", shapes["ngroups"])
    shapes.bind_optional("D", D, ("dim",))
    shapes.bind_optional("delta_bias", delta_bias, ("dim",))
    shapes.bind_optional("initial_state", initial_state, ("batch", "dim", "dstate"))
    for arg, value in (("delta", delta), ("z", z)):
        if value is not None and value.dtype != u.dtype:
            raise TypeError(f"{arg} must have the dtype of u ({u.dtype}), got {value.dtype}")
    if C.dtype != B.dtype:
        raise TypeError(f"C must have the dtype of B ({B.dtype}), got {C.dtype}")
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

    Shapes and math: see ``lnlm_ssm/ops/selective_scan/reference.py``. Returns y
    ``(batch, dim, seqlen)`` in u's dtype, or ``(y, last_state)`` with
    ``last_state`` ``(batch, dim, dstate)`` in fp32 (float64 for float64 u).
    Unlike mamba_ssm, gradients flow through ``last_state`` and into
    ``initial_state``.
    """
    shapes = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    kernel = resolve("selective_scan", backend, shapes.device, dtype=u.dtype)
    return kernel(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state=initial_state
    )
