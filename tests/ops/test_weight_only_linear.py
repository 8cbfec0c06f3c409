"""weight_only_linear: the formats (quantize_weight), the CPU kernel against the reference, and the public call."""

import pytest
import torch
import torch.nn.functional as F

from lnlm_ssm.ops import _backends, dequantize_weight, quantize_weight, weight_only_linear, weight_only_linear_ref
from lnlm_ssm.ops.linear.cpu import weight_only_linear_cpu
from lnlm_ssm.ops.linear.interface import MAX_ROWS, NO_BACKWARD
from lnlm_ssm.utils.testing import assert_close

MODES = ["int8", "bf16"]


def _operands(mode, rows, inner, out, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inner, generator=gen)
    weight, scale = quantize_weight(torch.randn(out, inner, generator=gen) / inner**0.5, mode)
    bias = torch.randn(out, generator=gen) if with_bias else None
    return x, weight, scale, bias


def _expected(x, weight, scale, bias=None):
    """The reference in float64: free of fp32 rounding, so that it checks the kernel, not the BLAS."""
    return weight_only_linear_ref(x.double(), weight, scale, bias).float()


# -- the formats ------------------------------------------------------------------------------


def test_int8_grid_holds_every_weight_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(67, 301, generator=gen) * torch.logspace(-3, 2, 67)[:, None]  # rows of any size
    weight[5] = 0.0  # a row of zeros
    weight[6, 7] = -weight[6].abs().max() * 1.5  # the row's extreme is negative
    q, scale = quantize_weight(weight, "int8")
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (67,)
    assert q.abs().max() == 127 and int(q.min()) >= -127
    assert torch.equal(scale, weight.abs().amax(dim=1) / 127)
    assert scale[5] == 0 and not q[5].any()
    assert q[6, 7] == -127
    # Every weight is within half a step of its row's grid (exactly: float64 products of the stored values).
    error = (weight.double() - q.double() * scale.double()[:, None]).abs()
    assert bool((error <= scale.double()[:, None] / 2).all())
    # The fp32 dequantisation adds at most its own rounding.
    deq = dequantize_weight(q, scale)
    assert deq.dtype == torch.float32
    assert bool(((weight - deq).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all())


def test_bf16_keeps_every_weight_within_its_rounding():
    weight = torch.randn(33, 70, generator=torch.Generator().manual_seed(1)) * 10
    stored, scale = quantize_weight(weight, "bf16")
    assert stored.dtype == torch.bfloat16 and scale is None
    assert torch.equal(stored, weight.to(torch.bfloat16))
    deq = dequantize_weight(stored, None)
    assert deq.dtype == torch.float32
    # 8 significant bits: half a unit in the last place is 2^-8 of the value at most.
    assert bool(((weight - deq).abs() <= weight.abs() * 2**-8).all())


@pytest.mark.parametrize(
    "weight,mode,match",
    [
        (torch.randn(3, 4), "int4", "mode must be one of"),
        (torch.randn(4), "int8", "matrix"),
        (torch.ones(3, 4, dtype=torch.int8), "int8", "floating-point"),
        (torch.tensor([[1.0, float("nan")]]), "int8", "inf or nan"),
        (torch.tensor([[1.0, float("inf")]]), "bf16", "inf or nan"),
    ],
)
def test_quantize_weight_errors(weight, mode, match):
    with pytest.raises(ValueError, match=match):
        quantize_weight(weight, mode)


# -- the kernel against the reference ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16])
@pytest.mark.parametrize("inner,out", [(1, 3), (7, 5), (48, 1536), (300, 67), (768, 769), (1537, 80)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_reference(mode, rows, inner, out, with_bias):
    x, weight, scale, bias = _operands(mode, rows, inner, out, with_bias, seed=rows * 1000 + inner + out)
    y = weight_only_linear_cpu(x, weight, scale, bias)
    assert y.dtype == torch.float32 and y.shape == (rows, out)
    assert_close(y, _expected(x, weight, scale, bias))


@pytest.mark.parametrize("mode", MODES)
def test_output_error_is_bounded_by_the_weight_error(mode):
    # |x . (w - w')| <= sum_k |x_k| |w_k - w'_k|: for int8, at most ||x||_1 * scale / 2 per output.
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(4, 768, generator=gen), torch.randn(200, 768, generator=gen) / 768**0.5
    q, scale = quantize_weight(weight, mode)
    exact = x.double() @ weight.double().T
    error = (weight_only_linear_cpu(x, q, scale, None).double() - exact).abs()
    if mode == "int8":
        bound = x.double().abs().sum(dim=1, keepdim=True) * scale.double()[None, :] / 2
    else:  # bf16: each weight within 2^-8 of itself
        bound = x.double().abs() @ weight.double().abs().T * 2**-8
    fp32_rounding = 1e-5 * (1 + exact.abs())
    assert bool((error <= bound + fp32_rounding).all())
    # And the bound is not vacuous: the error is a visible fraction of it.
    assert error.max() > 1e-3 * bound.max()


def test_strided_x_and_a_slice_of_the_weight_rows():
    # Rows of x with a gap between them, and the first rows of a larger weight (the LM head's vocab slice).
    x = torch.randn(5, 2, 512)[:, 0]
    q, scale = quantize_weight(torch.randn(100, 512), "int8")
    assert_close(weight_only_linear_cpu(x, q[:61], scale[:61], None), _expected(x, q[:61], scale[:61]))
    x_t = torch.randn(512, 3).t()  # unit stride along rows only: the launcher copies it
    assert_close(weight_only_linear_cpu(x_t, q, scale, None), _expected(x_t, q, scale))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_threads_agree_bitwise(mode, rows):
    # An odd number of weight rows, so that the split between threads leaves a partial tile.
    x, weight, scale, bias = _operands(mode, rows, 1536, 771, True, seed=rows)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = weight_only_linear_cpu(x, weight, scale, bias)
        torch.set_num_threads(2)
        two = weight_only_linear_cpu(x, weight, scale, bias)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@pytest.mark.parametrize(
    "weight,scale,bias,rows,match",
    [
        (torch.zeros(4, 256, dtype=torch.int8), torch.ones(4), None, 17, "m <= 16"),
        (torch.zeros(4, 255, dtype=torch.int8), torch.ones(4), None, 2, "k = 256"),
        (torch.zeros(4, 256), None, None, 2, "int8 or bfloat16"),
        (torch.zeros(4, 256, dtype=torch.int8), None, None, 2, "need a scale"),
        (torch.zeros(4, 256, dtype=torch.bfloat16), torch.ones(4), None, 2, "take none"),
        (torch.zeros(4, 256, dtype=torch.int8), torch.ones(5), None, 2, "scale must be"),
        (torch.zeros(4, 256, dtype=torch.int8), torch.ones(4).double(), None, 2, "scale must be"),
        (torch.zeros(4, 256, dtype=torch.int8), torch.ones(4), torch.ones(3), 2, "bias must be"),
    ],
)
def test_kernel_errors_name_the_argument(weight, scale, bias, rows, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lnlm_ssm.weight_only_linear(torch.randn(rows, 256), weight, scale, bias)


def test_aten_int8pack_mm_reads_the_same_format():
    # The benchmark's peer: torch's int8 weight-only product takes our int8 weight and scales as they are.
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        pytest.skip("this torch has no aten._weight_int8pack_mm")
    x, weight, scale, _ = _operands("int8", 3, 768, 96, False, seed=5)
    assert_close(op(x, weight, scale), _expected(x, weight, scale))


# -- the public call ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows,kernel_calls", [(1, 1), (MAX_ROWS, 1), (MAX_ROWS + 1, 0), (40, 0)])
def test_public_call_takes_the_kernel_for_up_to_16_rows(mode, rows, kernel_calls, monkeypatch):
    calls = []
    counting = lambda *a: calls.append(a) or weight_only_linear_cpu(*a)  # noqa: E731
    monkeypatch.setattr(_backends._PICKED, "weight_only_linear:cpu", counting, raising=False)
    x, weight, scale, bias = _operands(mode, rows, 300, 67, True, seed=rows)
    y = weight_only_linear(x.view(rows, 1, 300), weight, scale, bias)
    assert y.shape == (rows, 1, 67) and len(calls) == kernel_calls
    assert_close(y, _expected(x, weight, scale, bias).view(rows, 1, 67))


@pytest.mark.parametrize("mode", MODES)
def test_reference_backend_and_non_cpu_calls_take_the_reference(mode, monkeypatch):
    calls = []
    monkeypatch.setattr(_backends._PICKED, "weight_only_linear:cpu", lambda *a: calls.append(a), raising=False)
    x, weight, scale, bias = _operands(mode, 2, 64, 9, True, seed=7)
    y = weight_only_linear(x, weight, scale, bias, backend="reference")
    assert calls == []
    assert torch.equal(y, weight_only_linear_ref(x, weight, scale, bias))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [2, 20])
def test_backward_is_refused(mode, rows):
    x, weight, scale, bias = _operands(mode, rows, 64, 9, True, seed=8)
    x.requires_grad_(True)
    y = weight_only_linear(x, weight, scale, bias)
    assert y.requires_grad
    assert_close(y.detach(), _expected(x.detach(), weight, scale, bias))
    with pytest.raises(RuntimeError, match="weight_only_linear has no backward"):
        y.sum().backward()
    assert "quantize_" in NO_BACKWARD
    with torch.no_grad():
        assert not weight_only_linear(x, weight, scale, bias).requires_grad


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, w, s: weight_only_linear(x.double(), w, s), TypeError, "x must be float32"),
        (lambda x, w, s: weight_only_linear(x, w.float(), s), TypeError, "weight must be int8"),
        (lambda x, w, s: weight_only_linear(x, w, None), ValueError, "scale must be a float32"),
        (lambda x, w, s: weight_only_linear(x, w, s[:3]), ValueError, r"scale must be a float32 \(9,\)"),
        (lambda x, w, s: weight_only_linear(x, w.bfloat16(), s), ValueError, "scale must be None"),
        (lambda x, w, s: weight_only_linear(x[:, :10], w, s), ValueError, "in = x.shape"),
        (lambda x, w, s: weight_only_linear(x, w, s, torch.ones(9).double()), ValueError, "bias must be"),
        (lambda x, w, s: weight_only_linear(x, w.numpy(), s), TypeError, "weight must be a torch.Tensor"),
        (lambda x, w, s: weight_only_linear(x, w, s, backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_public_errors_name_the_argument(call, error, match):
    x, weight, scale, _ = _operands("int8", 2, 64, 9, False, seed=9)
    with pytest.raises(error, match=match):
        call(x, weight, scale)


@pytest.mark.parametrize("mode", MODES)
def test_compiles_fullgraph(mode):
    _, weight, scale, _ = _operands(mode, 1, 256, 64, False, seed=10)

    @torch.compile(fullgraph=True, backend="eager")
    def project(x):
        return weight_only_linear(x, weight, scale) * 2

    x = torch.randn(3, 256)
    with torch.no_grad():
        assert_close(project(x), 2 * _expected(x, weight, scale))


def test_reference_is_linear_on_the_dequantised_weight():
    x, weight, scale, bias = _operands("int8", 3, 40, 6, True, seed=11)
    assert torch.equal(weight_only_linear_ref(x, weight, scale, bias), F.linear(x, dequantize_weight(weight, scale), bias))
    assert weight_only_linear_ref(x.double(), weight, scale, bias).dtype == torch.float64
