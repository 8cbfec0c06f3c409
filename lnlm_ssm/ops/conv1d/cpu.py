"""Causal depthwise conv1d on the CPU: the C++ kernels of ``csrc/cpu/conv1d.cpp`` in autograd.

The forward saves only its inputs; the backward recomputes the convolution
where silu needs it. The final states (the last width - 1 inputs) are sliced
with torch outside the autograd.Function, so that a gradient through them alone
is a backward of its own, apart from the output's. Rows of x must be contiguous
along time: x is copied when it is not, e.g. when given channel-last as Mamba-2's
``xBC.transpose(1, 2)``.
"""

from __future__ import annotations

import torch

from lnlm_ssm.ops import _library
from lnlm_ssm.ops.conv1d.reference import SILU_NAMES, final_states, update_history
from lnlm_ssm.utils.dtypes import math_dtype

_ops = _library.load()


def _time_rows(t: torch.Tensor) -> torch.Tensor:
    """t itself when its rows are contiguous along time (any batch and dim strides), else a contiguous copy."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _as(t, dtype):
    """t contiguous in dtype: t itself, without a call into torch, when it already is (a decode step is short enough
    for those calls to show)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _opt(t, dtype):
    return None if t is None else _as(t, dtype)


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, seq_idx, silu):
        acc = math_dtype(x.dtype)
        args = (
            _time_rows(x),
            _as(weight, acc),
            _opt(bias, acc),
            _opt(initial_states, acc),
            _opt(seq_idx, torch.int64),
        )
        out = _ops.causal_conv1d_fwd(*args, silu)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(*args)
            ctx.silu = silu
            ctx.dtypes = (
                weight.dtype,
                None if bias is None else bias.dtype,
                None if initial_states is None else initial_states.dtype,
            )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, initial_states, seq_idx = ctx.saved_tensors
        weight_dtype, bias_dtype, initial_dtype = ctx.dtypes
        dx, dweight, dbias, dinitial = _ops.causal_conv1d_bwd(
            _time_rows(grad_out.to(x.dtype)),
            x,
            weight,
            bias,
            initial_states,
            seq_idx,
            ctx.silu,
        )
        return (
            dx,
            dweight.to(weight_dtype),
            None if bias_dtype is None else dbias.to(bias_dtype),
            None if initial_dtype is None else dinitial.to(initial_dtype),
            None,
            None,
        )


def causal_conv1d_cpu(
    x, weight, bias=None, activation=None, *, initial_states=None, return_final_states=False, seq_idx=None
):
    out = _CausalConv1d.apply(x, weight, bias, initial_states, seq_idx, activation in SILU_NAMES)
    if not return_final_states:
        return out
    return out, final_states(x, initial_states, weight.shape[1])


def causal_conv1d_update_cpu(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None):
    acc = math_dtype(x.dtype)
    args = (_as(weight, acc), _opt(bias, acc), activation in SILU_NAMES, cache_seqlens, conv_state_indices)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return _ops.causal_conv1d_update(x, conv_state, *args)
    # The update kernel has no backward: differentiate the convolution of x after
    # the history the kernel reads, taken before it takes x in.
    history = update_history(conv_state, weight.shape[1], cache_seqlens, conv_state_indices)
    steps = x.unsqueeze(-1) if x.ndim == 2 else x
    out = causal_conv1d_cpu(steps, weight, bias, activation, initial_states=history)
    if conv_state_indices is not None:
        out = out.masked_fill((conv_state_indices < 0)[:, None, None], 0)
    with torch.no_grad():
        _ops.causal_conv1d_update(x, conv_state, *args)
    return out.squeeze(-1) if x.ndim == 2 else out
