"""Weight-only quantisation: the stored formats, and the reference product ``weight_only_linear_ref``.

A weight W (out, in) is stored in one of two formats; x, the bias, the products
and the sums stay in fp32.

``int8``, symmetric, one scale per output channel (a row of W):

1. ``scale[j] = max_k |W[j, k]| / 127`` (0 for a row of zeros);
2. ``Wq[j, k] = round(W[j, k] / scale[j])``, in [-127, 127] (-128 is left out, so
   the range is symmetric and negating a weight is exact);
3. the weight it stands for is ``scale[j] * Wq[j, k]``, within ``scale[j] / 2`` of
   ``W[j, k]``: half a step of row j's grid, at most ``max_k |W[j, k]| / 254``.

``bf16``: W rounded to bfloat16 (to nearest, ties to even), which stands for
itself exactly in fp32: a relative error of at most 2^-8 per weight (8 significant bits).

``weight_only_linear_ref(x, weight, scale, bias) = F.linear(x, dequantize_weight(weight, scale), bias)``:
the specification the CPU kernel (csrc/cpu/linear.cpp) is tested against. The
kernel multiplies by the scale after the sum over ``in`` instead of before, which
rounds differently but not less accurately.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

INT8_MAX = 127
QUANTIZED_DTYPES = {"int8": torch.int8, "bf16": torch.bfloat16}
# Rows quantised at a time: the float64 math needs 8 bytes per weight of the block, not of the whole matrix.
_ROWS_PER_BLOCK = 4096


def quantize_weight(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(stored weight, scale)`` of a float weight (out, in): int8 and an fp32 scale (out,), or bf16 and None."""
    if mode not in QUANTIZED_DTYPES:
        raise ValueError(f"mode must be one of {sorted(QUANTIZED_DTYPES)}, got {mode!r}")
    if weight.ndim != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a floating-point (out, in) matrix, got {weight.dtype} {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight holds inf or nan, which no scale can represent")
    if mode == "bf16":
        return weight.detach().to(torch.bfloat16).contiguous(), None
    scale = weight.detach().abs().amax(dim=1).float() / INT8_MAX
    quantized = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    # In float64, so that the rounding in step 2 is to the nearest grid point of the fp32 scale
    # actually stored (fp32 division could put a weight on the far side of a half step).
    for rows in range(0, weight.shape[0], _ROWS_PER_BLOCK):
        block = slice(rows, rows + _ROWS_PER_BLOCK)
        step = scale[block].double()[:, None]
        step = torch.where(step > 0, step, 1.0)  # a row of zeros: any step gives zeros
        quantized[block] = (weight[block].detach().double() / step).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized, scale


def dequantize_weight(weight: torch.Tensor, scale: Optional[torch.Tensor] = None, dtype=torch.float32) -> torch.Tensor:
    """The weight a stored one stands for, in ``dtype``: ``scale[:, None] * weight`` for int8, the value for bf16."""
    if scale is None:
        return weight.to(dtype)
    return weight.to(dtype) * scale.to(dtype)[:, None]


def weight_only_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``F.linear(x, dequantize_weight(weight, scale), bias)`` in x's dtype (fp32; float64 for exact comparisons)."""
    return F.linear(x, dequantize_weight(weight, scale, x.dtype), None if bias is None else bias.to(x.dtype))
