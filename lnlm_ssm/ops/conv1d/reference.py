"""Reference causal depthwise conv1d, as in the causal-conv1d package.

Glossary: x (batch, dim, seqlen); weight (dim, width); bias (dim,);
conv states (batch, dim, width - 1) hold the last width - 1 inputs before x;
seq_idx (batch, seqlen) marks packed sequences.

    out[b, d, t] = bias[d] + Σ_{k<width} weight[d, k] · x[b, d, t - (width-1) + k]

where inputs before t = 0 come from ``initial_states`` (zeros by default) and
inputs of another packed sequence than t's count as zero. ``activation="silu"``
(or its alias "swish") applies silu to the result.

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
    out = _activate(out, activation).to(out_dtype)
    if not return_final_states:
        return out
    final_states = padded[..., padded.shape[-1] - (width - 1) :].to(out_dtype)
    if final_states_out is not None:
        final_states = final_states_out.copy_(final_states)
    return out, final_states


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """Decode step(s): x is (batch, dim) or (batch, dim, seqlen); conv_state
    (batch, dim, state_len >= width - 1) is shifted left by seqlen and updated in place."""
    single = x.ndim == 2
    if single:
        x = x.unsqueeze(-1)
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    history = conv_state[..., state_len - (width - 1) :]
    out = causal_conv1d_ref(x, weight, bias, history, activation=activation)
    conv_state.copy_(torch.cat([conv_state, x.to(conv_state.dtype)], dim=-1)[..., -state_len:])
    return out.squeeze(-1) if single else out
