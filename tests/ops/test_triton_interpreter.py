"""Loop forms our Triton kernels use, run by Triton's interpreter (no GPU needed).

Triton <= 3.6's interpreter could not take a runtime loop bound under NumPy >= 2.4
(lnlm_ssm/ops/_triton.py says why and works around it); these kernels hit each
form the scans use: an int argument, program_id/num_programs, tl.cdiv and
tl.minimum of runtime values, as start, stop and step. Expected values are
Python's own range over the same numbers.
"""

import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("checks Triton's interpreter, which runs only without a GPU here", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lnlm_ssm.ops import _triton  # noqa: E402, F401

# Decorated here, after TRITON_INTERPRET is set, so they are interpreted.


@triton.jit
def _grid_stride_kernel(out_ptr, rows, BLOCK: tl.constexpr):
    count = 0
    for start in range(tl.program_id(0) * BLOCK, rows, tl.num_programs(0) * BLOCK):
        count += 1
    tl.store(out_ptr + tl.program_id(0), count)


@triton.jit
def _bounded_kernel(out_ptr, n, tile, cap, STEP: tl.constexpr):
    total = 0
    for i in range(0, tl.cdiv(n, tile)):
        total += i
    for k in range(1, tl.minimum(n, cap), STEP):
        total += 100 * k
    tl.store(out_ptr, total)


@pytest.mark.parametrize("rows", [0, 1, 5, 17])
def test_grid_stride_loop(rows):
    programs, block = 3, 2
    out = torch.full((programs,), -1, dtype=torch.int32)
    _grid_stride_kernel[(programs,)](out, rows, BLOCK=block)
    expected = [len(range(p * block, rows, programs * block)) for p in range(programs)]
    assert out.tolist() == expected


@pytest.mark.parametrize("n, tile, cap", [(1, 4, 9), (9, 4, 5), (16, 8, 40)])
def test_cdiv_and_minimum_bounds(n, tile, cap):
    out = torch.full((1,), -1, dtype=torch.int32)
    _bounded_kernel[(1,)](out, n, tile, cap, STEP=2)
    expected = sum(range(0, -(-n // tile))) + sum(100 * k for k in range(1, min(n, cap), 2))
    assert out.item() == expected
