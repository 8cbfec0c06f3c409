"""decode_linear: the CPU kernel (csrc/cpu/linear.cpp) against F.linear, and where it hands over to F.linear."""

import pytest
import torch
import torch.nn.functional as F

from lnlm_ssm.ops import _backends, decode_linear
from lnlm_ssm.ops.linear.cpu import decode_linear_cpu
from lnlm_ssm.ops.linear.interface import MAX_ROWS, MIN_INNER, MIN_ROWS
from lnlm_ssm.utils.testing import assert_close


def _expected(x, weight, bias=None):
    """F.linear in float64, for a comparison free of the BLAS's own rounding."""
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double()).float()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("inner,out", [(256, 1), (256, 7), (300, 67), (768, 3072), (1537, 80)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_linear(rows, inner, out, with_bias):
    gen = torch.Generator().manual_seed(rows * 1000 + inner + out)
    x = torch.randn(rows, inner, generator=gen)
    weight = torch.randn(out, inner, generator=gen) / inner**0.5
    bias = torch.randn(out, generator=gen) if with_bias else None
    assert_close(decode_linear_cpu(x, weight, bias), _expected(x, weight, bias))


def test_strided_rows_of_x_and_weight():
    # Rows of x with a gap between them, and the first rows of a larger weight (the LM head's vocab slice).
    x = torch.randn(5, 2, 512)[:, 0]
    weight = torch.randn(100, 512)[:61]
    assert x.stride() == (1024, 1) and weight.is_contiguous()
    assert_close(decode_linear_cpu(x, weight, None), _expected(x, weight))
    x_t = torch.randn(512, 3).t()  # unit stride along rows only: the launcher copies it
    assert_close(decode_linear_cpu(x_t, weight, None), _expected(x_t, weight))


def test_leading_dimensions_and_public_call():
    x = torch.randn(2, 1, 3, 400)  # 6 rows: the kernel serves it
    weight, bias = torch.randn(33, 400), torch.randn(33)
    with torch.no_grad():
        y = decode_linear(x, weight, bias)
    assert y.shape == (2, 1, 3, 33)
    assert_close(y, _expected(x, weight, bias))


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("inner,out", [(256, 1), (768, 3072), (768, 50277), (1536, 80), (1537, 769)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_public_call_serves_one_to_three_rows(rows, inner, out, with_bias, monkeypatch):
    # A decode step of batch 1 to 3: the kernel, not the BLAS, serves it, and agrees with F.linear.
    calls = []
    counting = lambda *a: calls.append(a) or decode_linear_cpu(*a)  # noqa: E731
    monkeypatch.setattr(_backends._PICKED, "decode_linear:cpu", counting, raising=False)
    gen = torch.Generator().manual_seed(rows * 100 + out)
    x = torch.randn(rows, 1, inner, generator=gen)
    weight = torch.randn(out, inner, generator=gen) / inner**0.5
    bias = torch.randn(out, generator=gen) if with_bias else None
    with torch.no_grad():
        y = decode_linear(x, weight, bias)
    assert len(calls) == 1 and y.shape == (rows, 1, out)
    assert_close(y, _expected(x, weight, bias))
    assert_close(y, F.linear(x, weight, bias))


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_threads_agree_bitwise_one_to_three_rows(rows):
    # An odd number of weight rows, so that the split between threads leaves a partial tile.
    x, weight, bias = torch.randn(rows, 1536), torch.randn(771, 1536), torch.randn(771)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_linear_cpu(x, weight, bias)
        torch.set_num_threads(2)
        two = decode_linear_cpu(x, weight, bias)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize(
    "case",
    ["grad", "float64", "bfloat16", "too_few_rows", "too_many_rows", "small_inner", "reference_backend", "empty"],
)
def test_cases_the_kernel_does_not_serve_go_to_linear(case, monkeypatch):
    calls = []
    # Count the calls that reach the kernel: "auto" on CPU picks it from the dispatch cache.
    counting = lambda *a: calls.append(a) or F.linear(*a)  # noqa: E731
    monkeypatch.setattr(_backends._PICKED, "decode_linear:cpu", counting, raising=False)
    rows, inner, dtype, backend = MIN_ROWS, MIN_INNER, torch.float32, "auto"
    if case == "too_few_rows":
        rows = MIN_ROWS - 1
    if case == "too_many_rows":
        rows = MAX_ROWS + 1
    if case == "small_inner":
        inner = MIN_INNER - 1
    if case in ("float64", "bfloat16"):
        dtype = getattr(torch, case)
    if case == "reference_backend":
        backend = "reference"
    x = torch.randn(0 if case == "empty" else rows, inner, dtype=dtype, requires_grad=case == "grad")
    weight = torch.randn(9, inner, dtype=dtype)
    y = decode_linear(x, weight, backend=backend)
    assert calls == []
    torch.testing.assert_close(y, F.linear(x, weight))
    if case == "grad":
        y.sum().backward()
        torch.testing.assert_close(x.grad, weight.sum(0).expand_as(x))
    # The same call the kernel does serve reaches it.
    decode_linear(torch.randn(MIN_ROWS, MIN_INNER), torch.randn(9, MIN_INNER))
    assert len(calls) == 1


# From 8 rows the kernel takes wider tiles (3 weight rows by 8 rows of x); 3071 weight rows leave
# a partial tile at each thread's end, and 13 rows of x a narrower tile after the wide one.
@pytest.mark.parametrize("rows, out", [(8, 3072), (8, 3071), (13, 3071)])
def test_threads_agree_bitwise(rows, out):
    x, weight = torch.randn(rows, 768), torch.randn(out, 768)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_linear_cpu(x, weight, None)
        torch.set_num_threads(2)
        two = decode_linear_cpu(x, weight, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize(
    "x,weight,bias,match",
    [
        (torch.randn(17, 256), torch.randn(4, 256), None, "m <= 16"),
        (torch.randn(2, 256), torch.randn(4, 255), None, "k = 256"),
        (torch.randn(2, 256).double(), torch.randn(4, 256).double(), None, "float32"),
        (torch.randn(2, 256), torch.randn(4, 256), torch.randn(5), "bias must be"),
    ],
)
def test_kernel_errors_name_the_argument(x, weight, bias, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lnlm_ssm.decode_linear(x, weight, bias)


def test_compiles_fullgraph():
    weight = torch.randn(64, 256)

    @torch.compile(fullgraph=True, backend="eager")
    def project(x):
        return decode_linear(x, weight) * 2

    x = torch.randn(3, 256)
    with torch.no_grad():
        assert_close(project(x), 2 * _expected(x, weight))
