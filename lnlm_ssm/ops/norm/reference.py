"""Reference norms: the specification of ``layer_norm_fn``/``rms_norm_fn`` and of ``layernorm_fn``/``rmsnorm_fn``.

The normalisation, over groups of ``group`` channels of the last dimension
(hidden; one group of all of hidden unless ``group_size`` says otherwise):

    LayerNorm:  n = (h - mean(h)) / sqrt(var(h) + eps)       (var: the biased variance)
    RMSNorm:    n = h / sqrt(mean(h²) + eps)
    y = n ⊙ weight (+ bias)                                    (weight, bias: (hidden,))

**Add -> Norm** (``layer_norm_ref``, ``rms_norm_ref``; mamba_ssm's ``ops/triton/layer_norm.py``):

1. h <- x ⊙ rowscale                     (rowscale: one scale per row of x; not with x1)
2. h <- dropout(h), x1 <- dropout(x1)    (when dropout_p > 0: kept entries are divided by 1 - dropout_p,
                                          the kept ones given by dropout_mask / dropout_mask1 or drawn)
3. h <- h + x1 + residual                (each when given; h is the new residual)
4. y <- norm(h) ⊙ weight (+ bias), and y1 <- norm(h) ⊙ weight1 (+ bias1) when weight1 is given
   (the "parallel" norm: a second affine map of the same normalised h)

Returns ``y``, ``(y, y1)``, and with ``prenorm`` the new residual h last.

**Gated** (``layer_norm_gated_ref``, ``rms_norm_gated_ref``; mamba_ssm's ``ops/triton/layernorm_gated.py``,
whose reference is also called ``rms_norm_ref``, a name that here means the one above):

1. h <- x ⊙ silu(z)                      (when z is given and not norm_before_gate)
2. y <- norm(h) ⊙ weight (+ bias), per group of ``group_size`` channels (Mamba-2 normalises per group)
3. y <- y ⊙ silu(z)                      (when z is given and norm_before_gate)

Dtypes: with ``upcast`` every step runs in fp32 (float64 for float64 x), else in
x's dtype (the low-precision reference the kernels' error is measured against);
y and y1 are returned in x's dtype, the new residual in the dtype h was computed in.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lnlm_ssm.utils.dtypes import math_dtype


def _normalize(h, weight, bias, eps, group_size=None, is_rms_norm=True):
    """norm(h) ⊙ weight (+ bias) over groups of ``group_size`` channels, in h's dtype."""
    hidden = h.shape[-1]
    weight = weight.to(h.dtype)
    bias = None if bias is None else bias.to(h.dtype)
    if group_size is None or group_size == hidden:
        if is_rms_norm:
            y = F.rms_norm(h, (hidden,), weight, eps)
            return y if bias is None else y + bias
        return F.layer_norm(h, (hidden,), weight, bias, eps)
    grouped = h.unflatten(-1, (hidden // group_size, group_size))
    norm = F.rms_norm if is_rms_norm else F.layer_norm
    y = norm(grouped, (group_size,), eps=eps).flatten(-2) * weight
    return y if bias is None else y + bias


def _draw_keep_mask(t, p):
    """Which entries of t dropout with probability p keeps: bool, like t."""
    return torch.empty(t.shape, dtype=torch.bool, device=t.device).bernoulli_(1.0 - p)


def _dropout(t, p, mask):
    """Inverted dropout of t with the kept entries ``mask`` (drawn when None)."""
    if mask is None:
        mask = _draw_keep_mask(t, p)
    return t.masked_fill(~mask, 0.0) / (1.0 - p)


def _add_and_norm(
    x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, dropout_mask, dropout_mask1,
    is_rms_norm, compute,
):
    """Steps 1-4 of Add -> Norm in ``compute``: (y, y1 or None, h), y and y1 in x's dtype."""
    if x1 is not None and rowscale is not None:
        raise ValueError("rowscale cannot be combined with x1 (the parallel norm), as in mamba_ssm")
    h = x.to(compute)
    if rowscale is not None:
        h = h * rowscale.reshape(x.shape[:-1]).to(compute)[..., None]
    if x1 is not None:
        x1 = x1.to(compute)
    if dropout_p > 0.0:
        h = _dropout(h, dropout_p, dropout_mask)
        if x1 is not None:
            x1 = _dropout(x1, dropout_p, dropout_mask1)
    if x1 is not None:
        h = h + x1
    if residual is not None:
        h = h + residual.to(compute)
    y = _normalize(h, weight, bias, eps, is_rms_norm=is_rms_norm).to(x.dtype)
    y1 = None if weight1 is None else _normalize(h, weight1, bias1, eps, is_rms_norm=is_rms_norm).to(x.dtype)
    return y, y1, h


def outputs(y, y1, new_residual, masks=None):
    """mamba_ssm's return structure: y, then y1 (when there is one), then the new residual (when
    asked), then the two dropout masks (when asked); a lone y is returned bare."""
    out = (y,) + (() if y1 is None else (y1,)) + (() if new_residual is None else (new_residual,))
    out += () if masks is None else masks
    return out[0] if len(out) == 1 else out


def layer_norm_ref(
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
    dropout_mask=None,
    dropout_mask1=None,
    upcast=False,
):
    """LayerNorm of dropout(rowscale ⊙ x) + dropout(x1) + residual; see the module docstring."""
    compute = math_dtype(x.dtype) if upcast else x.dtype
    y, y1, h = _add_and_norm(
        x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, dropout_mask, dropout_mask1,
        False, compute,
    )
    return outputs(y, y1, h if prenorm else None)


def rms_norm_ref(
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
    dropout_mask=None,
    dropout_mask1=None,
    upcast=False,
):
    """RMSNorm of dropout(rowscale ⊙ x) + dropout(x1) + residual; see the module docstring."""
    compute = math_dtype(x.dtype) if upcast else x.dtype
    y, y1, h = _add_and_norm(
        x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, dropout_mask, dropout_mask1,
        True, compute,
    )
    return outputs(y, y1, h if prenorm else None)


def _gated_norm(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, compute):
    """Steps 1-3 of the gated norm in ``compute``; y in x's dtype."""
    h = x.to(compute)
    gate = None if z is None else F.silu(z.to(compute))
    if gate is not None and not norm_before_gate:
        h = h * gate
    y = _normalize(h, weight, bias, eps, group_size, is_rms_norm)
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)


def layer_norm_gated_ref(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, upcast=True):
    """LayerNorm per group, gated by silu(z) before or after; see the module docstring."""
    compute = math_dtype(x.dtype) if upcast else x.dtype
    return _gated_norm(x, weight, bias, z, eps, group_size, norm_before_gate, False, compute)


def rms_norm_gated_ref(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, upcast=True):
    """RMSNorm per group, gated by silu(z) before or after (mamba_ssm's layernorm_gated.rms_norm_ref)."""
    compute = math_dtype(x.dtype) if upcast else x.dtype
    return _gated_norm(x, weight, bias, z, eps, group_size, norm_before_gate, True, compute)


def residual_dtype(x: torch.Tensor, residual: Optional[torch.Tensor], residual_in_fp32: bool) -> torch.dtype:
    """The new residual's dtype in layer_norm_fn: the residual's, else fp32 (or wider) when
    ``residual_in_fp32``, else x's. As in mamba_ssm, the flag matters only without a residual:
    the first block starts the stream in fp32 and later blocks keep its dtype."""
    if residual is not None:
        return residual.dtype
    return math_dtype(x.dtype) if residual_in_fp32 else x.dtype


def layer_norm_reference(
    x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm, residual_in_fp32,
    is_rms_norm, return_dropout_mask,
):
    """Backend "reference" of layer_norm_fn / rms_norm_fn: the spec in fp32, masks drawn with torch."""
    masks = (None, None)
    if dropout_p > 0.0:
        masks = (_draw_keep_mask(x, dropout_p), None if x1 is None else _draw_keep_mask(x1, dropout_p))
    y, y1, h = _add_and_norm(
        x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, *masks, is_rms_norm,
        math_dtype(x.dtype),
    )
    new_residual = h.to(residual_dtype(x, residual, residual_in_fp32)) if prenorm else None
    return outputs(y, y1, new_residual, masks if return_dropout_mask else None)


def layernorm_gated_reference(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm):
    """Backend "reference" of layernorm_fn / rmsnorm_fn: the spec in fp32."""
    return _gated_norm(x, weight, bias, z, eps, group_size, norm_before_gate, is_rms_norm, math_dtype(x.dtype))
