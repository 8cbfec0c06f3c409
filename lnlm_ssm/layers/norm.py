"""RMSNorm module over ``lnlm_ssm.ops.rms_norm_fn``, with the block's fused "Add -> Norm"."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lnlm_ssm.ops import rms_norm_fn
from lnlm_ssm.ops._backends import BACKENDS


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension; parameter ``weight`` (ones at init)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        self.eps = eps
        self.backend = backend
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
        """norm(x + residual); with ``prenorm`` also the sum ``x + residual`` (fp32 when ``residual_in_fp32``).

        The sum is the residual stream a block passes on, so ``prenorm=True``
        returns ``(normed, new_residual)``.
        """
        return rms_norm_fn(
            x,
            self.weight,
            residual=residual,
            eps=self.eps,
            prenorm=prenorm,
            residual_in_fp32=residual_in_fp32,
            backend=self.backend,
        )
