"""Public norms, with mamba_ssm's names, positional orders and defaults:

- ``layer_norm_fn`` / ``rms_norm_fn`` (mamba_ssm.ops.triton.layer_norm): dropout, residual add, a second
  input x1 and a second output (weight1, bias1), then LayerNorm or RMSNorm;
- ``layernorm_fn`` / ``rmsnorm_fn`` (mamba_ssm.ops.triton.layernorm_gated): LayerNorm or RMSNorm per group,
  gated by silu(z).

Semantics in ``norm/reference.py``; ``backend`` is ours, keyword-only, last.
"""

from __future__ import annotations

import math
import numbers

from lnlm_ssm.ops._backends import register, resolve
from lnlm_ssm.ops._checks import Shapes, check_divisible, check_tensor
from lnlm_ssm.ops.norm.reference import layer_norm_reference, layernorm_gated_reference
from lnlm_ssm.utils.checks import check_positive_int

_ADD_NORM_KERNELS = {
    "reference": layer_norm_reference,
    "triton": "lnlm_ssm.ops.norm.triton:layer_norm_triton",
}
_GATED_KERNELS = {
    "reference": layernorm_gated_reference,
    "triton": "lnlm_ssm.ops.norm.triton:layernorm_gated_triton",
}
register("layer_norm_fn", _ADD_NORM_KERNELS)
register("rms_norm_fn", _ADD_NORM_KERNELS)
register("layernorm_fn", _GATED_KERNELS)
register("rmsnorm_fn", _GATED_KERNELS)


def _bind_x(x):
    x = check_tensor("x", x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension (..., hidden), got shape {tuple(x.shape)}")
    like_x = tuple(f"x.shape[{i}]" for i in range(x.ndim - 1)) + ("hidden",)
    shapes = Shapes()
    shapes.bind("x", x, like_x)
    return shapes, like_x


def _check_eps(eps) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")


def _check_add_norm(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale):
    shapes, like_x = _bind_x(x)
    shapes.bind("weight", weight, ("hidden",))
    shapes.bind_optional("bias", bias, ("hidden",))
    shapes.bind_optional("residual", residual, like_x)
    shapes.bind_optional("x1", x1, like_x)
    shapes.bind_optional("weight1", weight1, ("hidden",))
    shapes.bind_optional("bias1", bias1, ("hidden",))
    if bias1 is not None and weight1 is None:
        raise ValueError("bias1 was given without weight1: the second output is norm(x) * weight1 + bias1")
    if rowscale is not None:
        if x1 is not None:
            raise ValueError("rowscale cannot be combined with x1 (the parallel norm), as in mamba_ssm")
        rowscale = check_tensor("rowscale", rowscale)
        rows = math.prod(x.shape[:-1])
        if tuple(rowscale.shape) not in (tuple(x.shape[:-1]), (rows,)):
            raise ValueError(
                f"rowscale must hold one scale per row of x: shape {tuple(x.shape[:-1])} or ({rows},), "
                f"got shape {tuple(rowscale.shape)}"
            )
        shapes.bind("rowscale", rowscale, tuple(rowscale.shape))
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    _check_eps(eps)
    return shapes


def layer_norm_fn(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    residual_in_fp32=False,
    is_rms_norm=False,
    return_dropout_mask=False,
    *,
    backend="auto",
):
    """LayerNorm (RMSNorm with ``is_rms_norm``) of dropout(rowscale ⊙ x) + dropout(x1) + residual over the last
    dimension of x ``(..., hidden)``; see ``norm/reference.py``.

    Returns ``y``; with ``weight1`` also ``y1 = norm ⊙ weight1 + bias1``; with ``prenorm`` also the new
    residual (in the residual's dtype, else fp32 with ``residual_in_fp32``, else x's); with
    ``return_dropout_mask`` also the keep masks of x and x1 (bool, like x; None without dropout or x1),
    in that order: ``(y, [y1], [residual], [mask, mask1])``. Dropout applies whenever ``dropout_p > 0``:
    pass 0 outside training.
    """
    shapes = _check_add_norm(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale)
    kernel = resolve("rms_norm_fn" if is_rms_norm else "layer_norm_fn", backend, shapes.device, dtype=x.dtype)
    return kernel(
        x, weight, bias, residual, x1, weight1, bias1, eps, float(dropout_p), rowscale, bool(prenorm),
        bool(residual_in_fp32), bool(is_rms_norm), bool(return_dropout_mask),
    )


def rms_norm_fn(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    residual_in_fp32=False,
    return_dropout_mask=False,
    *,
    backend="auto",
):
    """``layer_norm_fn`` with ``is_rms_norm=True``: RMSNorm, no mean subtracted."""
    return layer_norm_fn(
        x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm, residual_in_fp32,
        True, return_dropout_mask, backend=backend,
    )


def layernorm_fn(
    x,
    weight,
    bias,
    z=None,
    eps=1e-6,
    group_size=None,
    norm_before_gate=True,
    is_rms_norm=False,
    *,
    backend="auto",
):
    """LayerNorm (RMSNorm with ``is_rms_norm``) over groups of ``group_size`` channels of x ``(..., hidden)``,
    gated by silu(z): ``norm(x) ⊙ silu(z)`` or, without ``norm_before_gate``, ``norm(x ⊙ silu(z))``.

    weight and bias cover all of hidden; ``group_size=None`` is one group. See ``norm/reference.py``.
    """
    shapes, like_x = _bind_x(x)
    shapes.bind("weight", weight, ("hidden",))
    shapes.bind_optional("bias", bias, ("hidden",))
    shapes.bind_optional("z", z, like_x)
    if group_size is not None:
        check_positive_int("group_size", group_size)
        check_divisible("hidden", shapes["hidden"], "group_size", group_size)
    _check_eps(eps)
    kernel = resolve("rmsnorm_fn" if is_rms_norm else "layernorm_fn", backend, shapes.device, dtype=x.dtype)
    return kernel(x, weight, bias, z, eps, group_size, bool(norm_before_gate), bool(is_rms_norm))


def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, *, backend="auto"):
    """``layernorm_fn`` with ``is_rms_norm=True``: RMSNorm per group, gated by silu(z) (Mamba-2's norm)."""
    return layernorm_fn(x, weight, bias, z, eps, group_size, norm_before_gate, True, backend=backend)
