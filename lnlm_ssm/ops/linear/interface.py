"""``decode_linear``: ``F.linear`` for the few rows of a decode step.

The BLAS behind ``F.linear`` reads the weight well below memory speed when x has
a few rows (about 15 GB/s for one row and 6-9 GB/s for four, against ~29 GB/s
copy bandwidth on our 2-core AVX2 machines), and decoding is exactly that product
for every projection. The CPU kernel (csrc/cpu/linear.cpp) streams each weight row
once and takes every row of x against it: at 2 threads on the projections of a
130M model it reads the weight at 0.9-1.0x copy bandwidth for one row and
0.85-1.05x for two to four, 1.7-2x ``F.linear`` for one row and 2.9-5.7x for two
to four, 1.5-3x at 8 rows (``benchmarks/step_ops_speed.py``, results of record in
``benchmarks/results/step_ops-cpu-2core-epyc-20261202``). From 8 rows the FMAs
start to count: x_proj (80 outputs, its weights in the last-level cache) is as
fast as the BLAS at 8 rows and 0.8x at 16. With an inner size below 256
(dt_proj's 48) the kernel's reductions weigh more than its reads: as fast as the
BLAS for one row, 1.2-1.7x for two to four, slower from 8 rows on; those go to
the BLAS. So it serves fp32 on the CPU, 1 to 16 rows, inner size >= 256, without
autograd; anything else goes to ``F.linear``, so the function is a drop-in for
``F.linear`` anywhere.
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
