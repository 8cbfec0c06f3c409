"""Reference causal depthwise conv1d, as in the causal-conv1d package.

Glossary: x (batch, dim, seqlen); weight (dim, width); bias (dim,);
conv states (batch, dim, width - 1) hold the last width - 1 inputs before x;
seq_idx (batch, seqlen) marks packed sequences, a negative id a padding token.

    out[b, d, t] = bias[d] + Σ_{k<width} weight[d, k] · x[b, d, t - (width-1) + k]

where inputs before t = 0 come from ``initial_states`` (zeros by default) and
inputs of another packed sequence than t's count as zero. ``activation="silu"``
(or its alias "swish") applies silu to the result. With seq_idx, a padding
token's output is 0 (no bias either), and as no real token shares its negative
id, no padding input reaches a real token's output.

The decode update keeps a cache ``conv_state`` (batch, dim, state_len), state_len
>= width - 1, of the latest inputs. Without ``cache_seqlens`` it is a shift
register, newest last. With ``cache_seqlens`` (batch,) it is a circular buffer:
row b's next input goes to slot cache_seqlens[b] mod state_len, so the slots
from there on, wrapping around, hold its inputs oldest first.

Math runs in fp32 (float64 for float64 x); outputs and final states are in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lnlm_ssm.utils.dtypes import math_dtype

SILU_NAMES = ("silu", "swish")
ACTIVATIONS = (None,) + SILU_NAMES


def _activate(out, activation):
    return F.silu(out) if activation in SILU_NAMES else out


def final_states(x, initial_states, width):
    """The last width - 1 inputs, the initial states' among them when x is shorter, in x's dtype.

    What every backend returns as the final conv states (the kernels compute only the output).
    """
    carry, seqlen = width - 1, x.shape[-1]
    if seqlen >= carry:
        return x[..., seqlen - carry :].clone()
    history = x.new_zeros(*x.shape[:2], carry) if initial_states is None else initial_states.to(x.dtype)
    return torch.cat([history[..., seqlen:], x], dim=-1)


def causal_conv1d_ref(
    x,
    weight,
    bias=None,
    initial_states=None,
    return_final_states=False,
    final_states_out=None,
    activation=None,
    *,
    seq_idx=None,
):
    """The causal-conv1d package's ``causal_conv1d_ref``, in its positional order.

    ``final_states_out`` (batch, dim, width - 1), when given with ``return_final_states``,
    receives the final states in place and is the tensor returned.
    """
    out_dtype = x.dtype
    compute = math_dtype(x.dtype)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]

    history = x.new_zeros(batch, dim, width - 1) if initial_states is None else initial_states
    padded = torch.cat([history.to(compute), x.to(compute)], dim=-1)  # (b, d, width - 1 + seqlen)
    weight = weight.to(compute)
    out = torch.zeros(batch, dim, seqlen, dtype=compute, device=x.device)
    if bias is not None:
        out = out + bias.to(compute)[:, None]
    if seq_idx is not None:
        # The history belongs to the row's first sequence.
        padded_seq = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=-1)
    for k in range(width):
        window = padded[..., k : k + seqlen]
        if seq_idx is not None:
            window = window * (padded_seq[:, k : k + seqlen] == seq_idx).to(compute)[:, None, :]
        out = out + weight[:, k, None] * window
    if seq_idx is not None:
        out = out.masked_fill((seq_idx < 0)[:, None, :], 0.0)
    out = _activate(out, activation).to(out_dtype)
    if not return_final_states:
        return out
    final_states = padded[..., padded.shape[-1] - (width - 1) :].to(out_dtype)
    if final_states_out is not None:
        final_states = final_states_out.copy_(final_states)
    return out, final_states


def _slots(cache_seqlens, state_len, steps):
    """(batch, len(steps)): the circular-buffer slot of each row's step ``steps`` (0 = its next input)."""
    return torch.remainder(cache_seqlens.to(torch.int64)[:, None] + steps, state_len)


def conv_history(conv_state, width, cache_seqlens=None):
    """The width - 1 latest inputs of each row of conv_state, oldest first: the history of its next input."""
    state_len = conv_state.shape[-1]
    if cache_seqlens is None:
        return conv_state[..., state_len - (width - 1) :]
    steps = torch.arange(-(width - 1), 0, device=conv_state.device)
    slots = _slots(cache_seqlens, state_len, steps)
    return conv_state.gather(-1, slots[:, None, :].expand(-1, conv_state.shape[1], -1))


def _take_in(conv_state, steps, cache_seqlens):
    """Writes the inputs ``steps`` (batch, dim, seqlen) into conv_state in place, after its latest ones."""
    state_len, seqlen = conv_state.shape[-1], steps.shape[-1]
    steps = steps.detach().to(conv_state.dtype)
    if cache_seqlens is None:
        conv_state.copy_(torch.cat([conv_state, steps], dim=-1)[..., -state_len:])
        return
    # Inputs beyond the buffer's length would overwrite each other: only the last state_len stay.
    kept = min(seqlen, state_len)
    slots = _slots(cache_seqlens, state_len, torch.arange(seqlen - kept, seqlen, device=conv_state.device))
    conv_state.scatter_(-1, slots[:, None, :].expand(-1, conv_state.shape[1], -1), steps[..., seqlen - kept :])


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    """The causal-conv1d package's ``causal_conv1d_update_ref``: decode step(s) x (batch, dim) or
    (batch, dim, seqlen) after the inputs held in conv_state (batch, dim, state_len >= width - 1),
    which then takes x in, in place.

    ``cache_seqlens`` (batch,): conv_state is a circular buffer whose row b takes its
    next input at slot cache_seqlens[b] mod state_len (see the module docstring); the
    caller advances cache_seqlens. The state gets no gradient.
    """
    single = x.ndim == 2
    steps = x.unsqueeze(-1) if single else x
    history = conv_history(conv_state, weight.shape[1], cache_seqlens)
    out = causal_conv1d_ref(steps, weight, bias, history, activation=activation)
    _take_in(conv_state, steps, cache_seqlens)
    return out.squeeze(-1) if single else out


def update_history(conv_state, width, cache_seqlens=None, conv_state_indices=None):
    """The history each batch row's update reads (batch, dim, width - 1), a copy; zeros for padding rows.

    conv_state_indices (batch,) picks each row's slot of the pool conv_state; a negative index is padding.
    """
    if conv_state_indices is None:
        return conv_history(conv_state, width, cache_seqlens).clone()
    live = conv_state_indices >= 0
    rows = conv_state[conv_state_indices.clamp(min=0).to(torch.int64)]
    return conv_history(rows, width, cache_seqlens).masked_fill(~live[:, None, None], 0)


def causal_conv1d_update_indexed_ref(
    x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None
):
    """``causal_conv1d_update_ref`` on a pool of states: the "reference" backend of ``causal_conv1d_update``.

    With ``conv_state_indices`` (batch,), conv_state is a pool (pool, dim, state_len)
    whose slot conv_state_indices[b] is batch row b's state: the rows are gathered,
    updated and scattered back. A negative index marks a padding row: its output
    is 0 and the pool is not touched for it.
    """
    if conv_state_indices is None:
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation, cache_seqlens)
    live = conv_state_indices >= 0
    slots = conv_state_indices[live].to(torch.int64)
    states = conv_state[slots]
    out = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    out[live] = causal_conv1d_update_ref(
        x[live], states, weight, bias, activation, None if cache_seqlens is None else cache_seqlens[live]
    )
    conv_state[slots] = states
    return out


def causal_conv1d_varlen_states_ref(x, cu_seqlens, state_len):
    """The causal-conv1d package's ``causal_conv1d_varlen_states_ref``: each packed sequence's last inputs.

    x (total_tokens, dim) holds the sequences back to back, sequence b in
    x[cu_seqlens[b] : cu_seqlens[b + 1]]. Returns states (batch, dim, state_len),
    batch = len(cu_seqlens) - 1, with

        states[b, :, j] = x[cu_seqlens[b + 1] - state_len + j]   if that token is in sequence b, else 0,

    i.e. the sequence's last state_len inputs right-aligned, zeros before its start:
    the conv_state a decode continuing sequence b starts from. In x's dtype, laid
    out as causal-conv1d lays it out: dim is the fastest axis (stride 1).
    """
    total, dim = x.shape
    batch = cu_seqlens.shape[0] - 1
    if total == 0:
        return x.new_zeros(batch, state_len, dim).transpose(1, 2)
    starts, ends = cu_seqlens[:-1].to(torch.int64), cu_seqlens[1:].to(torch.int64)
    tokens = ends[:, None] - state_len + torch.arange(state_len, device=x.device)  # (batch, state_len)
    inside = tokens >= starts[:, None]
    states = x[tokens.clamp(0, total - 1)].masked_fill(~inside[..., None], 0)  # (batch, state_len, dim)
    return states.transpose(1, 2)
