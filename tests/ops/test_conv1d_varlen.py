"""causal_conv1d_varlen_states: each packed sequence's last inputs, as the conv states a decode continues from."""

import pytest
import torch
import torch.nn.functional as F

from lnlm_ssm.ops import (
    causal_conv1d_fn,
    causal_conv1d_update,
    causal_conv1d_varlen_states,
    causal_conv1d_varlen_states_ref,
)
from lnlm_ssm.utils.testing import assert_close

f64 = torch.float64


def offsets(lengths, dtype=torch.int32):
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(dtype)


def looped(x, lengths, state_len):
    """One sequence at a time: its last state_len tokens, right-aligned after zeros."""
    states = torch.zeros(len(lengths), x.shape[1], state_len, dtype=x.dtype)
    start = 0
    for b, n in enumerate(lengths):
        last = x[max(start, start + n - state_len) : start + n].T
        states[b, :, state_len - last.shape[1] :] = last
        start += n
    return states


@pytest.mark.parametrize("state_len", [0, 1, 4, 9])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_matches_a_loop_over_sequences(state_len, index_dtype):
    """Sequences longer and shorter than state_len, and empty ones."""
    lengths = [5, 0, 1, 12, 3, 0]
    x = torch.randn(sum(lengths), 6, dtype=f64)
    cu_seqlens = offsets(lengths, index_dtype)
    expected = looped(x, lengths, state_len)
    for states in (causal_conv1d_varlen_states(x, cu_seqlens, state_len), causal_conv1d_varlen_states_ref(x, cu_seqlens, state_len)):
        assert states.shape == (len(lengths), 6, state_len)
        assert torch.equal(states, expected)


def test_dtype_and_layout_are_causal_conv1ds():
    """In x's dtype, dim the fastest axis (causal-conv1d allocates (batch, state_len, dim) and transposes)."""
    x = torch.randn(40, 8, 20).to(torch.bfloat16)[:, :, 3]  # strided x: its rows are not contiguous
    states = causal_conv1d_varlen_states(x, offsets([10, 30]), 4)
    assert states.dtype == torch.bfloat16
    assert states.stride() == (32, 1, 8)
    assert torch.equal(states, looped(x, [10, 30], 4))


def test_no_tokens_at_all():
    states = causal_conv1d_varlen_states(torch.randn(0, 3), offsets([0, 0]), 2)
    assert torch.equal(states, torch.zeros(2, 3, 2))


def test_states_are_the_final_states_of_each_sequence():
    """With state_len = width - 1 they are what causal_conv1d_fn returns as final states, sequence by sequence."""
    lengths, width = [7, 2, 1, 9], 4
    x = torch.randn(sum(lengths), 5, dtype=f64)
    weight = torch.randn(5, width, dtype=f64)
    states = causal_conv1d_varlen_states(x, offsets(lengths), width - 1)
    for b, part in enumerate(x.split(lengths)):
        _, final = causal_conv1d_fn(part.T[None], weight, return_final_states=True)
        assert torch.equal(states[b], final[0]), f"sequence {b}"


def test_a_decode_continues_from_them():
    """Prefill packed sequences, take their states, decode one more token each: as if each sequence ran whole."""
    lengths, width, dim = [6, 1, 3], 4, 5
    x = torch.randn(sum(lengths), dim, dtype=f64)
    following = torch.randn(len(lengths), dim, dtype=f64)
    weight, bias = torch.randn(dim, width, dtype=f64), torch.randn(dim, dtype=f64)
    conv_state = causal_conv1d_varlen_states(x, offsets(lengths), width - 1)
    step = causal_conv1d_update(following, conv_state, weight, bias, "silu")
    for b, part in enumerate(x.split(lengths)):
        whole = torch.cat([part, following[b : b + 1]]).T[None]
        assert_close(step[b], causal_conv1d_fn(whole, weight, bias, activation="silu")[0, :, -1], msg=f"sequence {b}")
