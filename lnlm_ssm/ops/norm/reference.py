"""Reference RMSNorm with optional fused residual add and optional z gating.

Steps, over the last dimension (hidden) of x:

1. x <- x + residual                       (when residual is given; the sum is the new residual)
2. x <- x ⊙ silu(z)                        (when z is given and not norm_before_gate)
3. y <- x / sqrt(mean(x²) + eps) ⊙ weight (+ bias), the mean taken over groups of
   ``group_size`` channels (default: all of hidden; Mamba-2 norms per group)
4. y <- y ⊙ silu(z)                        (when z is given and norm_before_gate)

Math runs in fp32 (float64 for float64 x); y is returned in x's dtype. With
``prenorm=True`` the new residual is returned too, in fp32 when
``residual_in_fp32`` (float64 stays float64: the flag asks for at least fp32)
else in the residual's dtype (x's when there is none).
"""

from __future__ import annotations

import torch.nn.functional as F

from lnlm_ssm.utils.dtypes import math_dtype


def rms_norm_ref(
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
):
    out_dtype = x.dtype
    compute = math_dtype(x.dtype)
    residual_dtype = residual.dtype if residual is not None else x.dtype
    if residual_in_fp32:
        residual_dtype = math_dtype(residual_dtype)

    h = x.to(compute)
    if residual is not None:
        h = h + residual.to(compute)
    new_residual = h
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.to(compute))
    hidden = h.shape[-1]
    if group_size is None or group_size == hidden:
        y = F.rms_norm(h, (hidden,), weight.to(compute), eps)
    else:
        y = F.rms_norm(h.unflatten(-1, (hidden // group_size, group_size)), (group_size,), eps=eps)
        y = y.flatten(-2) * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    if z is not None and norm_before_gate:
        y = y * F.silu(z.to(compute))
    y = y.to(out_dtype)
    return (y, new_residual.to(residual_dtype)) if prenorm else y
