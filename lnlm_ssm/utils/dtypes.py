"""The one rule for the dtype math runs in: float64 stays float64, everything else computes in float32.

References, layers and losses accumulate in fp32 whatever the storage dtype (bf16
and fp16 lose too much in sums, exps and log-softmaxes), and keep float64 for
float64 inputs so that double-precision tests can check the fast paths tightly.
"""

from __future__ import annotations

import torch


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_math_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` in ``math_dtype(t.dtype)`` (no copy when it already is)."""
    return t.to(math_dtype(t.dtype))
