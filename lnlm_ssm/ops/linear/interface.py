"""``decode_linear``: ``F.linear`` for the few rows of a decode step.

The BLAS behind ``F.linear`` reads the weight well below memory speed when x has
a few rows (about 13 GB/s for one row and 4-7 GB/s for four, against 20-30 GB/s
copy bandwidth on our 2-core AVX2 machines), and decoding is exactly that product
for every projection. The CPU kernel (csrc/cpu/linear.cpp) streams each weight row
once and takes every row of x against it: at 2 threads on the projections of a
130M model it reads the weight at about copy bandwidth for 1 to 3 rows, 1.5-2x
``F.linear`` for one row and 3-5x for two to four (``benchmarks/step_ops_speed.py``).
With an inner size below 256 the kernel's reductions cost more than its reads
from 4 rows on, and it is no faster than the BLAS for one. So it serves fp32 on
the CPU, 1 to 16 rows, inner size >= 256, without autograd; anything else goes to
``F.linear``, so the function is a drop-in for ``F.linear`` anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lnlm_ssm.ops._backends import backend_for, register, resolve

MIN_ROWS, MAX_ROWS = 1, 16
MIN_INNER = 256


def _linear_ref(x, weight, bias):
    return F.linear(x, weight, bias)


register("decode_linear", {"reference": _linear_ref, "cpu": "lnlm_ssm.ops.linear.cpu:decode_linear_cpu"})


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
