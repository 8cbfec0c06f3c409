"""Gradients reach every float input of the public ops, including through the returned state alone."""

import pytest
import torch

from lnlm_ssm.ops import causal_conv1d_fn, layer_norm_fn, mamba_chunk_scan_combined, rmsnorm_fn, selective_scan_fn


def leaves(**shapes):
    return {k: torch.randn(*s, requires_grad=True) for k, s in shapes.items()}


def assert_all_grads(inputs, loss):
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    for name, g in zip(inputs, grads):
        assert g is not None, f"no gradient reaches {name}"
        assert g.abs().sum() > 0, f"zero gradient at {name}"


@pytest.mark.parametrize("through", ["y", "last_state"])
def test_selective_scan(through):
    t = leaves(u=(2, 4, 6), delta=(2, 4, 6), A=(4, 3), B=(2, 3, 6), C=(2, 3, 6), D=(4,), z=(2, 4, 6), delta_bias=(4,), initial_state=(2, 4, 3))
    y, last = selective_scan_fn(**t, delta_softplus=True, return_last_state=True)
    if through == "y":
        assert_all_grads(t, y.square().sum())
    else:
        # The last state does not depend on C, D or z; everything that shapes it must get a gradient.
        inputs = {k: v for k, v in t.items() if k not in ("C", "D", "z")}
        assert_all_grads(inputs, last.square().sum())


@pytest.mark.parametrize("through", ["y", "final_states"])
def test_ssd(through):
    t = leaves(x=(2, 10, 4, 2), dt=(2, 10, 4), A=(4,), B=(2, 10, 2, 3), C=(2, 10, 2, 3), D=(4,), z=(2, 10, 4, 2), dt_bias=(4,), initial_states=(2, 4, 2, 3))
    y, final = mamba_chunk_scan_combined(**t, chunk_size=4, dt_softplus=True, return_final_states=True)
    if through == "y":
        assert_all_grads(t, y.square().sum())
    else:
        inputs = {k: v for k, v in t.items() if k not in ("C", "D", "z")}
        assert_all_grads(inputs, final.square().sum())


def test_ssd_varlen_states():
    """Through the states at the end of each packed sequence alone (mamba_ssm has no gradient there)."""
    t = leaves(x=(1, 10, 4, 2), dt=(1, 10, 4), A=(4,), B=(1, 10, 2, 3), C=(1, 10, 2, 3), dt_bias=(4,), initial_states=(1, 4, 2, 3))
    seq_idx = torch.tensor([[0] * 6 + [1] * 4])
    _, varlen = mamba_chunk_scan_combined(
        **t, chunk_size=4, seq_idx=seq_idx, cu_seqlens=torch.tensor([0, 6, 10]), dt_softplus=True, return_varlen_states=True
    )
    assert_all_grads({k: v for k, v in t.items() if k != "C"}, varlen.square().sum())


def test_conv1d():
    t = leaves(x=(2, 3, 5), weight=(3, 4), bias=(3,), initial_states=(2, 3, 3))
    out, final = causal_conv1d_fn(t["x"], t["weight"], t["bias"], initial_states=t["initial_states"], return_final_states=True, activation="silu")
    assert_all_grads(t, out.square().sum())
    assert_all_grads({"x": t["x"]}, final.square().sum())


@pytest.mark.parametrize("is_rms_norm", [True, False])
def test_norm(is_rms_norm):
    t = leaves(x=(3, 8), weight=(8,), bias=(8,), residual=(3, 8), x1=(3, 8), weight1=(8,), bias1=(8,))
    y, y1, new_residual = layer_norm_fn(*t.values(), prenorm=True, is_rms_norm=is_rms_norm)
    assert_all_grads(t, y.square().sum() + y1.square().sum() + new_residual.square().sum())
    t = leaves(x=(3, 8), weight=(8,), residual=(3, 8), rowscale=(3,))
    y = layer_norm_fn(t["x"], t["weight"], None, t["residual"], rowscale=t["rowscale"], is_rms_norm=is_rms_norm)
    assert_all_grads(t, y.square().sum())


def test_gated_norm():
    t = leaves(x=(3, 8), weight=(8,), bias=(8,), z=(3, 8))
    assert_all_grads(t, rmsnorm_fn(*t.values(), group_size=4).square().sum())
