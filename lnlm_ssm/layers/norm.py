"""The block norms, both with the block's fused "Add -> Norm" call ``norm(x, residual, prenorm, residual_in_fp32)``.

- ``RMSNorm`` over ``lnlm_ssm.ops.rms_norm_fn`` (mamba_ssm's, and Llama's);
- ``LayerNorm``, nn.LayerNorm over ``lnlm_ssm.ops.layer_norm_fn``, for configs with ``rms_norm=False``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lnlm_ssm.ops import layer_norm_fn, rms_norm_fn
from lnlm_ssm.ops._backends import check_backend
from lnlm_ssm.utils.checks import check_positive_int


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
    """nn.LayerNorm (parameters ``weight`` and ``bias``) with RMSNorm's "Add -> Norm" call and ``backend``."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None, backend: str = "auto") -> None:
        check_positive_int("hidden_size", hidden_size)
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        super().__init__(hidden_size, eps=eps, device=device, dtype=dtype)
        self.backend = check_backend(backend)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        """LayerNorm(x + residual); with ``prenorm`` also the sum, with RMSNorm's dtype rules."""
        return layer_norm_fn(
            x,
            self.weight,
            self.bias,
            residual=residual,
            eps=self.eps,
            prenorm=prenorm,
            residual_in_fp32=residual_in_fp32,
            backend=self.backend,
        )
