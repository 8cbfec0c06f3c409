"""The block norms, both with the block's fused "Add -> Norm" call ``norm(x, residual, prenorm, residual_in_fp32)``.

- ``RMSNorm`` over ``lnlm_ssm.ops.rms_norm_fn`` (mamba_ssm's, and Llama's);
- ``LayerNorm``, nn.LayerNorm with the same call, for configs with ``rms_norm=False``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.ops import rms_norm_fn
from lnlm_ssm.ops._backends import check_backend
from lnlm_ssm.utils.checks import check_positive_int
from lnlm_ssm.utils.dtypes import math_dtype


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension; parameter ``weight`` (ones at init)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.eps = eps
        self.backend = check_backend(backend)
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(
        self,
        x: torch.Tensor,
        residual: Optional[torch.Tensor] = None,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
    ):
        """norm(x + residual); with ``prenorm`` also the sum ``x + residual``.

        The sum is the residual stream a block passes on, so ``prenorm=True``
        returns ``(normed, new_residual)``, in the residual's dtype; the first
        block (no residual yet) starts it in fp32 when ``residual_in_fp32``.
        """
        return rms_norm_fn(
            x,
            self.weight,
            None,
            residual=residual,
            eps=self.eps,
            prenorm=prenorm,
            residual_in_fp32=residual_in_fp32,
            backend=self.backend,
        )


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with RMSNorm's "Add -> Norm" call (parameters ``weight`` and ``bias``)."""

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        # Same dtype rules as rms_norm_fn: the sum in fp32 (or wider), y in x's dtype.
        compute = math_dtype(x.dtype)
        total = x.to(compute) if residual is None else x.to(compute) + residual.to(compute)
        y = F.layer_norm(total, self.normalized_shape, self.weight.to(compute), self.bias.to(compute), self.eps)
        y = y.to(x.dtype)
        if not prenorm:
            return y
        residual_dtype = torch.float32 if residual_in_fp32 else (x.dtype if residual is None else residual.dtype)
        return y, total.to(residual_dtype)
