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


# ---------------------------------------------------------------- causal-conv1d's padding, circular buffers, pools


def test_seq_idx_padding_outputs_zero_and_leaks_nowhere():
    """seq_idx -1 marks padding: its output is 0 (no bias), and the real tokens give what their
    sequences give alone, whatever the padding holds (no gradient reaches it either)."""
    width = 4
    runs = [[(0, 3), (-1, 2), (1, 4)], [(-1, 3), (2, 5), (-1, 1)], [(3, 2), (-1, 1), (3, 3), (-1, 3)]]
    seq_idx = torch.tensor([[i for i, n in row for _ in range(n)] for row in runs])
    x = torch.randn(3, 5, 9, dtype=f64, requires_grad=True)
    weight, bias = torch.randn(5, width, dtype=f64), torch.randn(5, dtype=f64)
    out = causal_conv1d_fn(x, weight, bias, seq_idx, activation="silu", backend="reference")
    padding = seq_idx < 0
    assert out.detach().masked_select(padding[:, None, :]).eq(0).all()
    for b, row in enumerate(runs):
        ids = seq_idx[b]
        for sid in {i for i, _ in row if i >= 0}:
            where = (ids == sid).nonzero()[:, 0]
            # A sequence may have padding inside: its tokens then see each other across it, as in causal-conv1d.
            span = slice(int(where[0]), int(where[-1]) + 1)
            alone = x.detach()[b : b + 1, :, span] * (ids[span] == sid)
            expected = causal_conv1d_ref(alone, weight, bias, activation="silu")[0]
            assert_close(out[b, :, where], expected[:, where - span.start], msg=f"row {b} sequence {sid}")
    (dx,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert dx.masked_select(padding[:, None, :].expand_as(dx)).abs().sum() == 0
    moved = x.detach() + 100 * padding[:, None, :]
    assert torch.equal(causal_conv1d_fn(moved, weight, bias, seq_idx, activation="silu", backend="reference"), out.detach())


def test_seq_idx_padding_gradcheck():
    x = torch.randn(1, 2, 7, dtype=f64, requires_grad=True)
    weight = torch.randn(2, 3, dtype=f64, requires_grad=True)
    bias = torch.randn(2, dtype=f64, requires_grad=True)
    seq_idx = torch.tensor([[-1, 0, 0, -1, 1, 1, -1]])
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d_ref(*a, activation="silu", seq_idx=seq_idx), (x, weight, bias))


def oldest_first(circular, cache_seqlens):
    """A circular buffer's rows rolled so that each starts at its next write slot: the shift-register layout."""
    return torch.stack([row.roll(-int(n) % row.shape[-1], dims=-1) for row, n in zip(circular, cache_seqlens)])


@pytest.mark.parametrize("seqlen", [None, 1, 3, 8])
@pytest.mark.parametrize("state_len", [3, 5])
def test_circular_buffer_equals_the_rolled_shift_register(seqlen, state_len):
    """With cache_seqlens, conv_state is read and written as a shift register would be after rolling each row
    to start at slot cache_seqlens % state_len; seqlen 8 > state_len wraps more than once."""
    batch, dim, width = 4, 3, 4
    x = torch.randn((batch, dim) if seqlen is None else (batch, dim, seqlen), dtype=f64)
    weight, bias = torch.randn(dim, width, dtype=f64), torch.randn(dim, dtype=f64)
    circular = torch.randn(batch, dim, state_len, dtype=f64)
    cache_seqlens = torch.tensor([0, 2, 7, 1000], dtype=torch.int32)
    linear = oldest_first(circular, cache_seqlens)
    out = causal_conv1d_update_ref(x, circular, weight, bias, "silu", cache_seqlens)
    expected = causal_conv1d_update_ref(x, linear, weight, bias, "silu")
    assert_close(out, expected)
    assert torch.equal(oldest_first(circular, cache_seqlens + (seqlen or 1)), linear)


def test_circular_steps_equal_the_full_convolution():
    batch, dim, width, seqlen = 2, 3, 4, 11
    x = torch.randn(batch, dim, seqlen, dtype=f64)
    weight, bias = torch.randn(dim, width, dtype=f64), torch.randn(dim, dtype=f64)
    conv_state = torch.zeros(batch, dim, 5, dtype=f64)
    cache_seqlens = torch.zeros(batch, dtype=torch.int64)
    outs = []
    for t in range(0, seqlen, 2):
        chunk = x[..., t : t + 2]
        outs.append(causal_conv1d_update(chunk, conv_state, weight, bias, "silu", cache_seqlens, backend="reference"))
        cache_seqlens += chunk.shape[-1]
    assert_close(torch.cat(outs, -1), causal_conv1d_ref(x, weight, bias, activation="silu"))
    assert torch.equal(oldest_first(conv_state, cache_seqlens), x[..., -5:])


@pytest.mark.parametrize("circular", [False, True])
def test_state_indices_equal_gather_update_scatter(circular):
    """Row b updates pool slot conv_state_indices[b]; a negative index outputs 0 and touches nothing."""
    batch, dim, width, state_len, pool_size = 5, 3, 3, 4, 8
    x = torch.randn(batch, dim, 2, dtype=f64)
    weight, bias = torch.randn(dim, width, dtype=f64), torch.randn(dim, dtype=f64)
    pool = torch.randn(pool_size, dim, state_len, dtype=f64)
    indices = torch.tensor([6, -1, 0, 3, -1], dtype=torch.int32)
    cache_seqlens = torch.tensor([4, 0, 9, 2, 1], dtype=torch.int32) if circular else None
    expected_pool = pool.clone()
    updated = causal_conv1d_update(x, pool, weight, bias, "silu", cache_seqlens, indices, backend="reference")
    for b, slot in enumerate(indices.tolist()):
        if slot < 0:
            assert torch.equal(updated[b], torch.zeros_like(updated[b]))
            continue
        state = expected_pool[slot : slot + 1]
        lens = None if cache_seqlens is None else cache_seqlens[b : b + 1]
        assert_close(updated[b], causal_conv1d_update_ref(x[b : b + 1], state, weight, bias, "silu", lens)[0])
    assert torch.equal(pool, expected_pool)


def test_update_with_state_indices_has_gradients():
    x = torch.randn(3, 2, 2, dtype=f64, requires_grad=True)
    weight = torch.randn(2, 3, dtype=f64, requires_grad=True)
    bias = torch.randn(2, dtype=f64, requires_grad=True)
    pool = torch.randn(4, 2, 2, dtype=f64)
    indices = torch.tensor([2, -1, 0])

    def f(x, weight, bias):
        return causal_conv1d_update(x, pool.clone(), weight, bias, "silu", None, indices, backend="reference")

    assert torch.autograd.gradcheck(f, (x, weight, bias))
    (dx,) = torch.autograd.grad(f(x, weight, bias).sum(), x)
    assert dx[1].abs().sum() == 0 and dx[0].abs().sum() > 0
