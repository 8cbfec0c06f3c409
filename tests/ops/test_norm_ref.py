"""RMSNorm reference: plain formula, residual add, gating in both orders, groups."""

import pytest
import torch
import torch.nn.functional as F

from lnlm_ssm.ops import rms_norm_fn, rms_norm_ref
from lnlm_ssm.utils.testing import assert_close

f64 = torch.float64


def by_formula(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def test_plain():
    x, w = torch.randn(3, 5, 8, dtype=f64), torch.randn(8, dtype=f64)
    assert_close(rms_norm_fn(x, w, eps=1e-5), by_formula(x, w, 1e-5))


def test_bias_and_residual():
    x, res, w, b = torch.randn(4, 8, dtype=f64), torch.randn(4, 8, dtype=f64), torch.randn(8, dtype=f64), torch.randn(8, dtype=f64)
    y, new_res = rms_norm_fn(x, w, b, residual=res, prenorm=True)
    assert_close(new_res, x + res)
    assert_close(y, by_formula(x + res, w, 1e-6) + b)


def test_residual_in_fp32():
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8)
    y, new_res = rms_norm_fn(x, w, residual=torch.randn(4, 8, dtype=torch.bfloat16), prenorm=True, residual_in_fp32=True)
    assert y.dtype == torch.bfloat16 and new_res.dtype == torch.float32
    _, res_first_layer = rms_norm_fn(x, w, prenorm=True)
    assert res_first_layer.dtype == torch.bfloat16 and torch.equal(res_first_layer, x)
    # "at least fp32": a float64 residual stream keeps its precision.
    x64, res64 = torch.randn(4, 8, dtype=f64), torch.randn(4, 8, dtype=f64)
    _, new_res64 = rms_norm_fn(x64, w.double(), residual=res64, prenorm=True, residual_in_fp32=True)
    assert new_res64.dtype == f64 and torch.equal(new_res64, x64 + res64)


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 4])
def test_gating_and_groups(norm_before_gate, group_size):
    x, z, w = torch.randn(2, 8, dtype=f64), torch.randn(2, 8, dtype=f64), torch.randn(8, dtype=f64)
    y = rms_norm_ref(x, w, z=z, group_size=group_size, norm_before_gate=norm_before_gate)
    g = 8 if group_size is None else group_size
    h = x if norm_before_gate else x * F.silu(z)
    expected = by_formula(h.view(2, -1, g), torch.ones(g, dtype=f64), 1e-6).view(2, 8) * w
    if norm_before_gate:
        expected = expected * F.silu(z)
    assert_close(y, expected)


def test_gradcheck():
    x, z, res = (torch.randn(2, 6, dtype=f64, requires_grad=True) for _ in range(3))
    w, b = torch.randn(6, dtype=f64, requires_grad=True), torch.randn(6, dtype=f64, requires_grad=True)

    def f(x, w, b, z, res):
        return rms_norm_ref(x, w, b, residual=res, z=z, group_size=3, prenorm=True)

    assert torch.autograd.gradcheck(f, (x, w, b, z, res))
