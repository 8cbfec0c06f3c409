"""Causal conv1d reference against a naive loop, state chaining, packing and the update step."""

import pytest
import torch
import torch.nn.functional as F

from lnlm_ssm.ops import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref
from lnlm_ssm.utils.testing import assert_close

f64 = torch.float64


def naive_conv(x, weight, bias, activation, history=None):
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    out = torch.zeros(batch, dim, seqlen, dtype=f64)
    for b in range(batch):
        for d in range(dim):
            for t in range(seqlen):
                acc = float(bias[d]) if bias is not None else 0.0
                for k in range(width):
                    src = t - (width - 1) + k
                    if src >= 0:
                        acc += float(weight[d, k]) * float(x[b, d, src])
                    elif history is not None:
                        acc += float(weight[d, k]) * float(history[b, d, width - 1 + src])
                out[b, d, t] = acc
    return F.silu(out) if activation == "silu" else out


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_history", [True, False])
def test_matches_naive(width, activation, with_bias, with_history):
    x = torch.randn(2, 3, 6, dtype=f64)
    weight = torch.randn(3, width, dtype=f64)
    bias = torch.randn(3, dtype=f64) if with_bias else None
    history = torch.randn(2, 3, width - 1, dtype=f64) if with_history else None
    out = causal_conv1d_ref(x, weight, bias, initial_states=history, activation=activation)
    assert_close(out, naive_conv(x, weight, bias, activation, history))


@pytest.mark.parametrize("split", [1, 2, 5])
def test_final_states_chain(split):
    x = torch.randn(2, 3, 8, dtype=f64)
    weight, bias = torch.randn(3, 4, dtype=f64), torch.randn(3, dtype=f64)
    full = causal_conv1d_fn(x, weight, bias, activation="silu")
    first, states = causal_conv1d_fn(x[..., :split], weight, bias, return_final_states=True, activation="silu")
    second = causal_conv1d_fn(x[..., split:], weight, bias, initial_states=states, activation="silu")
    assert_close(torch.cat([first, second], -1), full)


def test_final_states_out_is_written():
    x, weight = torch.randn(1, 2, 5), torch.randn(2, 3)
    buffer = torch.zeros(1, 2, 2)
    out, states = causal_conv1d_fn(x, weight, return_final_states=True, final_states_out=buffer)
    assert states is buffer and torch.equal(buffer, x[..., -2:])


def test_seq_idx_equals_separate_sequences():
    lengths = [3, 1, 6]
    x = torch.randn(1, 4, sum(lengths), dtype=f64)
    weight, bias = torch.randn(4, 4, dtype=f64), torch.randn(4, dtype=f64)
    history = torch.randn(1, 4, 3, dtype=f64)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    out = causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, initial_states=history, activation="silu")
    start = 0
    for i, n in enumerate(lengths):
        part = causal_conv1d_fn(x[..., start : start + n], weight, bias, initial_states=history if i == 0 else None, activation="silu")
        assert_close(out[..., start : start + n], part, msg=f"sequence {i}")
        start += n


@pytest.mark.parametrize("tokens_per_step", [1, 3])
@pytest.mark.parametrize("extra_state", [0, 2])
def test_update_equals_full(tokens_per_step, extra_state):
    width, seqlen = 4, 9
    x = torch.randn(2, 3, seqlen, dtype=f64)
    weight, bias = torch.randn(3, width, dtype=f64), torch.randn(3, dtype=f64)
    full = causal_conv1d_ref(x, weight, bias, activation="silu")
    conv_state = torch.zeros(2, 3, width - 1 + extra_state, dtype=f64)
    outs = []
    for start in range(0, seqlen, tokens_per_step):
        chunk = x[..., start : start + tokens_per_step]
        if tokens_per_step == 1:
            outs.append(causal_conv1d_update(chunk[..., 0], conv_state, weight, bias, "silu").unsqueeze(-1))
        else:
            outs.append(causal_conv1d_update(chunk, conv_state, weight, bias, "silu"))
    assert_close(torch.cat(outs, -1), full)
    keep = width - 1 + extra_state
    assert_close(conv_state, x[..., -keep:])


def test_gradcheck():
    x = torch.randn(1, 2, 5, dtype=f64, requires_grad=True)
    weight = torch.randn(2, 3, dtype=f64, requires_grad=True)
    bias = torch.randn(2, dtype=f64, requires_grad=True)
    history = torch.randn(1, 2, 2, dtype=f64, requires_grad=True)

    def f(x, weight, bias, history):
        return causal_conv1d_ref(x, weight, bias, initial_states=history, return_final_states=True, activation="silu")

    assert torch.autograd.gradcheck(f, (x, weight, bias, history))


def test_low_precision_keeps_dtype():
    x, weight = torch.randn(2, 8, 16, dtype=torch.bfloat16), torch.randn(8, 4)
    out, states = causal_conv1d_fn(x, weight, return_final_states=True, activation="silu", backend="reference")
    assert out.dtype == states.dtype == torch.bfloat16
    assert_close(out, causal_conv1d_ref(x.double(), weight.double(), activation="silu"), torch.bfloat16)
    step = causal_conv1d_update_ref(x[..., 0], torch.zeros(2, 8, 3, dtype=torch.bfloat16), weight, activation="silu")
    assert step.dtype == torch.bfloat16
    assert torch.equal(step, out[..., 0])


def test_reference_takes_the_incumbents_positional_order():
    # causal-conv1d's causal_conv1d_ref(x, weight, bias, initial_states, return_final_states,
    # final_states_out, activation): a positional initial_states must be used, not taken for the activation.
    x, weight, bias = torch.randn(2, 6, 9), torch.randn(6, 4), torch.randn(6)
    history = torch.randn(2, 6, 3)
    by_position = causal_conv1d_ref(x, weight, bias, history)
    assert_close(by_position, causal_conv1d_ref(x, weight, bias, initial_states=history))
    assert not torch.allclose(by_position, causal_conv1d_ref(x, weight, bias))
    final_out = torch.empty(2, 6, 3)
    out, final = causal_conv1d_ref(x, weight, bias, history, True, final_out, "silu")
    assert final is final_out and torch.equal(final_out, x[..., -3:])
    assert_close(out, causal_conv1d_ref(x, weight, bias, initial_states=history, activation="silu"))
