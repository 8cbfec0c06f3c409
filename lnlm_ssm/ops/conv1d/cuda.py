"""Causal depthwise conv1d on the GPU: the kernels of the ``causal-conv1d`` package.

The "cuda" backend of ``causal_conv1d_fn`` / ``causal_conv1d_update`` exists only
when that package is importable (``interface.py`` registers it then); otherwise
"auto" goes on to Triton. Its kernels cover widths 2 to 4 and no initial states
together with ``seq_idx``: other calls raise a ValueError that says so rather than
falling back to something slower. The final states are sliced here, as on the CPU,
so they work for every layout of x.
"""

from __future__ import annotations

import causal_conv1d
import torch

from lnlm_ssm.ops.conv1d.reference import SILU_NAMES, final_states

_WIDTHS = (2, 3, 4)


def _check(weight, activation):
    width = weight.shape[1]
    if width not in _WIDTHS:
        raise ValueError(
            f"weight must have width 2, 3 or 4 for the causal-conv1d kernels (backend 'cuda'), got {width}; "
            "use backend='triton' or 'reference' for other widths"
        )
    return "silu" if activation in SILU_NAMES else None


def _int32(index):
    """The causal-conv1d kernels read index tensors (seq_idx, cache_seqlens, conv_state_indices) as int32."""
    return None if index is None else index.to(torch.int32)


def causal_conv1d_cuda(
    x, weight, bias=None, activation=None, *, initial_states=None, return_final_states=False, seq_idx=None
):
    act = _check(weight, activation)
    if seq_idx is not None and initial_states is not None:
        raise ValueError(
            "initial_states and seq_idx cannot be given together to the causal-conv1d kernels (backend 'cuda'); "
            "use backend='triton' or 'reference'"
        )
    out = causal_conv1d.causal_conv1d_fn(
        x, weight, bias, seq_idx=_int32(seq_idx), initial_states=initial_states, activation=act
    )
    if not return_final_states:
        return out
    return out, final_states(x, initial_states, weight.shape[1])


def causal_conv1d_update_cuda(
    x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None
):
    return causal_conv1d.causal_conv1d_update(
        x, conv_state, weight, bias, _check(weight, activation), _int32(cache_seqlens), _int32(conv_state_indices)
    )
