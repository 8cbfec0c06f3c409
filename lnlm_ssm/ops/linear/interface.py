"""``decode_linear``: ``F.linear`` for the few rows of a decode step.

The BLAS behind ``F.linear`` reads the weight well below memory speed when x has
a few rows (about 15 GB/s for one row and 6-9 GB/s for four, against ~29 GB/s
copy bandwidth on our 2-core AVX2 machines), and decoding is exactly that product
for every projection. The CPU kernel (csrc/cpu/linear.cpp) streams each weight row
once and takes every row of x against it: at 2 threads on the projections of a
130M model (2-core EPYC) it reads in_proj's and out_proj's weights at 0.9-1.1x
copy bandwidth for one to four rows, 2.2-2.7x ``F.linear`` for one row and
2.7-6.3x for two to four, 2.3-4.3x at 8 rows (``benchmarks/step_ops_speed.py``,
results of record in ``benchmarks/results/step_ops-cpu-2core-epyc-20261203``,
where the machine's drifting bandwidth is discussed). From 8 rows the FMAs
start to count: x_proj (80 outputs, its weights in the last-level cache) is
1.1-1.7x the BLAS at 8 rows and 0.8-1.5x at 16 (runs of 2026-12-02 and -03).
With an inner size below 256 (dt_proj's 48) the kernel's reductions weigh more
than its reads: 1.0-2.2x the BLAS for one to three rows, 0.5-0.9x from 8 rows
on; those go to the BLAS. So it serves fp32 on the CPU, 1 to 16 rows, inner size >= 256, without
autograd; anything else goes to ``F.linear``, so the function is a drop-in for
``F.linear`` anywhere.

``weight_only_linear``: the same product with the weight stored as int8 (with a
scale per output row) or bf16, in the formats of ``reference.py``, which
``lnlm_ssm.quantize_`` gives a model's projections. A decode step reads every
weight once, so reading a quarter (int8) or half (bf16) of the bytes is the
point; x, the sums and the output stay fp32. Its CPU kernel is
``decode_linear``'s with each weight vector widened to fp32 as it is loaded, and
serves 1 to 16 rows of any inner size: below 256 the alternative is not a fast
BLAS but a dequantised copy of the weight. Other calls take the reference
(dequantise, then ``F.linear``): for a prefill's many rows one fp32 copy of the
weight is small beside a product that reads it once per row. Quantised weights
are for inference: the backward raises.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lnlm_ssm.ops._backends import backend_for, check_backend, register, resolve
from lnlm_ssm.ops.linear.reference import weight_only_linear_ref

MIN_ROWS, MAX_ROWS = 1, 16
MIN_INNER = 256


def _linear_ref(x, weight, bias):
    return F.linear(x, weight, bias)


register("decode_linear", {"reference": _linear_ref, "cpu": "lnlm_ssm.ops.linear.cpu:decode_linear_cpu"})
register(
    "weight_only_linear",
    {"reference": weight_only_linear_ref, "cpu": "lnlm_ssm.ops.linear.cpu:weight_only_linear_cpu"},
)

NO_BACKWARD = (
    "weight_only_linear has no backward: weight-only quantised weights (lnlm_ssm.quantize_) are for inference; "
    "train the float model and quantise it afterwards"
)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias=None, *, backend: str = "auto") -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., in), weight (out, in) -> (..., out).

    ``backend``: a model's backend; "reference" always takes ``F.linear``, and the
    backends without a kernel for this op ("triton", "cuda") go by "auto".
    """
    backend = backend_for("decode_linear", backend)
    inner = x.shape[-1]
    rows = x.numel() // inner if inner else 0
    if not (
        backend != "reference"
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and MIN_ROWS <= rows <= MAX_ROWS
        and inner >= MIN_INNER
        and weight.ndim == 2
        and weight.stride(-1) == 1
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
    ):
        return F.linear(x, weight, bias)
    kernel = resolve("decode_linear", backend, x.device, dtype=x.dtype)
    return kernel(x.reshape(rows, inner), weight, bias).view(*x.shape[:-1], weight.shape[0])


class _InferenceOnly(torch.autograd.Function):
    """``kernel(x, weight, scale, bias)`` in the graph of x (or bias), with a backward that raises."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, kernel):
        return kernel(x, weight, scale, bias)

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError(NO_BACKWARD)


def _check_weight_only(x, weight, scale, bias) -> None:
    for name, t in (("x", x), ("weight", weight), ("scale", scale), ("bias", bias)):
        if (t is not None or name in ("x", "weight")) and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32 (weight-only quantisation computes in fp32), got {x.dtype}")
    if weight.dtype not in (torch.int8, torch.bfloat16):
        raise TypeError(f"weight must be int8 (with a scale) or bfloat16, got {weight.dtype}")
    if x.ndim < 1 or weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must be (out, in) with in = x.shape[-1], got weight {tuple(weight.shape)} and x {tuple(x.shape)}"
        )
    out = weight.shape[0]
    if weight.dtype == torch.int8:
        if scale is None or scale.dtype != torch.float32 or scale.shape != (out,):
            got = "None" if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
            raise ValueError(f"scale must be a float32 ({out},) tensor for an int8 weight ({out}, in), got {got}")
    elif scale is not None:
        raise ValueError(f"scale must be None for a bfloat16 weight (it stands for itself), got {tuple(scale.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out,)):
        raise ValueError(f"bias must be a float32 ({out},) tensor or None, got {bias.dtype} {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("scale", scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def weight_only_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ (scale[:, None] * weight)^T + bias``: x (..., in) fp32; weight (out, in) int8 with scale (out,), or bf16.

    Returns fp32 (..., out). The formats are ``lnlm_ssm.ops.quantize_weight``'s;
    ``backend`` is as ``decode_linear``'s. The backward raises (inference only).
    """
    _check_weight_only(x, weight, scale, bias)
    backend = backend_for("weight_only_linear", check_backend(backend))
    inner = x.shape[-1]
    rows = x.numel() // inner if inner else 0
    lead = x.shape[:-1]
    if backend != "reference" and x.device.type == "cpu" and MIN_ROWS <= rows <= MAX_ROWS and weight.stride(-1) == 1:
        kernel = resolve("weight_only_linear", backend, x.device, dtype=x.dtype)
        x = x.reshape(rows, inner)
    else:
        kernel = weight_only_linear_ref
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        y = _InferenceOnly.apply(x, weight, scale, bias, kernel)
    else:
        y = kernel(x, weight, scale, bias)
    return y.reshape(*lead, weight.shape[0])
