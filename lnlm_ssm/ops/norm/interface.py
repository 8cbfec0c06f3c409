"""Public RMSNorm with fused residual add and z gating: ``rms_norm_fn``."""

from __future__ import annotations

from lnlm_ssm.ops._backends import register, resolve
from lnlm_ssm.ops._checks import Shapes, check_divisible, check_tensor
from lnlm_ssm.ops.norm.reference import rms_norm_ref
from lnlm_ssm.utils.checks import check_positive_int

_KERNELS = {
    "reference": rms_norm_ref,
    "triton": "lnlm_ssm.ops.norm.triton:rms_norm_triton",
}
register("rms_norm_fn", _KERNELS)


def rms_norm_fn(
    x,
    weight,
    bias=None,
    *,
    residual=None,
    z=None,
    eps=1e-6,
    group_size=None,
    norm_before_gate=True,
    prenorm=False,
    residual_in_fp32=False,
    backend="auto",
):
    """RMSNorm over the last dimension of x ``(..., hidden)``; see ``norm/reference.py``.

    Returns y like x, or ``(y, new_residual)`` with ``prenorm=True``.
    """
    x = check_tensor("x", x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension (..., hidden), got shape {tuple(x.shape)}")
    like_x = tuple(f"x.shape[{i}]" for i in range(x.ndim - 1)) + ("hidden",)
    shapes = Shapes()
    shapes.bind("x", x, like_x)
    shapes.bind("weight", weight, ("hidden",))
    shapes.bind_optional("bias", bias, ("hidden",))
    shapes.bind_optional("residual", residual, like_x)
    shapes.bind_optional("z", z, like_x)
    if group_size is not None:
        check_positive_int("group_size", group_size)
        check_divisible("hidden", shapes["hidden"], "group_size", group_size)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    kernel = resolve("rms_norm_fn", backend, shapes.device, dtype=x.dtype)
    return kernel(
        x,
        weight,
        bias,
        residual=residual,
        z=z,
        eps=eps,
        group_size=group_size,
        norm_before_gate=norm_before_gate,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
    )
