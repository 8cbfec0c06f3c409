"""GatedMLP against its formula; RMSNorm and LayerNorm modules against the written-out norm and the fused residual add."""

import pytest
import torch
import torch.nn.functional as F

from lnlm_ssm.layers.mlp import GatedMLP
from lnlm_ssm.layers.norm import LayerNorm, RMSNorm
from lnlm_ssm.ops import rms_norm_ref
from lnlm_ssm.utils.testing import assert_close

f64 = torch.float64


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", [F.silu, F.gelu])
def test_gated_mlp_formula(bias, activation):
    mlp = GatedMLP(6, hidden_features=5, out_features=4, activation=activation, bias=bias, multiple_of=1, dtype=f64)
    x = torch.randn(2, 3, 6, dtype=f64)
    h = x @ mlp.fc1.weight.T + (mlp.fc1.bias if bias else 0)
    value, gate = h[..., :5], h[..., 5:]
    expected = (value * activation(gate)) @ mlp.fc2.weight.T + (mlp.fc2.bias if bias else 0)
    assert_close(mlp(x), expected)


@pytest.mark.parametrize(
    "in_features, hidden_features, multiple_of, expected_hidden",
    [(48, None, 128, 128), (96, None, 128, 256), (96, None, 1, 256), (64, 100, 16, 112), (64, 128, 128, 128)],
)
def test_gated_mlp_hidden_size(in_features, hidden_features, multiple_of, expected_hidden):
    mlp = GatedMLP(in_features, hidden_features, multiple_of=multiple_of)
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == {
        "fc1.weight": (2 * expected_hidden, in_features),
        "fc2.weight": (in_features, expected_hidden),
    }


def test_gated_mlp_errors():
    with pytest.raises(ValueError, match="hidden_features must be a positive integer"):
        GatedMLP(8, hidden_features=0)
    with pytest.raises(ValueError, match="multiple_of"):
        GatedMLP(8, multiple_of=0)
    with pytest.raises(TypeError, match="activation must be callable"):
        GatedMLP(8, activation="silu")


def rms_formula(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_rms_norm_plain():
    norm = RMSNorm(8, eps=1e-3, dtype=f64)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 3, 8, dtype=f64)
    assert_close(norm(x), rms_formula(x, norm.weight, 1e-3))
    assert list(norm.state_dict()) == ["weight"]
    assert torch.equal(RMSNorm(8).weight, torch.ones(8))


def test_rms_norm_add_then_norm():
    norm = RMSNorm(8, dtype=f64)
    with torch.no_grad():
        norm.weight.normal_()
    x, residual = torch.randn(2, 3, 8, dtype=f64), torch.randn(2, 3, 8, dtype=f64)
    out, new_residual = norm(x, residual=residual, prenorm=True)
    assert_close(new_residual, x + residual)
    assert_close(out, rms_formula(x + residual, norm.weight, 1e-5))
    assert_close(norm(x, residual=residual), out)


def test_rms_norm_residual_in_fp32():
    norm = RMSNorm(8, dtype=torch.bfloat16)
    x, residual = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.float32)
    out, new_residual = norm(x, residual=residual, prenorm=True, residual_in_fp32=True)
    assert out.dtype == torch.bfloat16 and new_residual.dtype == torch.float32
    assert_close(new_residual, x.float() + residual)
    expected, _ = rms_norm_ref(x, norm.weight, None, residual=residual, eps=1e-5, prenorm=True, upcast=True)
    assert torch.equal(out, expected)

    # The first block has no residual yet: the stream starts as x itself, in fp32.
    _, first = norm(x, prenorm=True, residual_in_fp32=True)
    assert first.dtype == torch.float32 and torch.equal(first, x.float())


def test_rms_norm_backend_is_passed_through():
    norm = RMSNorm(4, backend="reference", dtype=f64)
    x = torch.randn(3, 4, dtype=f64)
    assert_close(norm(x), rms_formula(x, norm.weight, 1e-5))
    norm.backend = "no-such-backend"
    with pytest.raises(ValueError, match="no-such-backend"):
        norm(x)


def test_rms_norm_errors():
    with pytest.raises(ValueError, match="hidden_size must be a positive integer"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="eps must be positive"):
        RMSNorm(4, eps=0.0)
    with pytest.raises(ValueError, match="backend"):
        RMSNorm(4, backend="gpu")


def test_layer_norm_module():
    norm = LayerNorm(8, eps=1e-3, dtype=f64, backend="reference")
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    assert list(norm.state_dict()) == ["weight", "bias"]
    x, residual = torch.randn(2, 3, 8, dtype=f64), torch.randn(2, 3, 8, dtype=f64)
    out, new_residual = norm(x, residual=residual, prenorm=True)
    assert_close(new_residual, x + residual)
    assert_close(out, F.layer_norm(x + residual, (8,), norm.weight, norm.bias, 1e-3))
    _, first = LayerNorm(8, dtype=torch.bfloat16)(x.bfloat16(), prenorm=True, residual_in_fp32=True)
    assert first.dtype == torch.float32
    norm.backend = "no-such-backend"
    with pytest.raises(ValueError, match="no-such-backend"):
        norm(x)
    with pytest.raises(ValueError, match="backend"):
        LayerNorm(4, backend="gpu")
