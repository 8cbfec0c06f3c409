"""Public causal conv1d: ``causal_conv1d_fn`` and ``causal_conv1d_update``, as in causal-conv1d."""

from __future__ import annotations

import importlib.util

from lnlm_ssm.ops._backends import register, resolve
from lnlm_ssm.ops._checks import Shapes, check_seq_idx
from lnlm_ssm.ops.conv1d.reference import ACTIVATIONS, causal_conv1d_ref, causal_conv1d_update_ref
from lnlm_ssm.utils.checks import check_choice

_KERNELS = {
    "reference": causal_conv1d_ref,
    "cpu": "lnlm_ssm.ops.conv1d.cpu:causal_conv1d_cpu",
    "triton": "lnlm_ssm.ops.conv1d.triton:causal_conv1d_triton",
}
_UPDATE_KERNELS = {
    "reference": causal_conv1d_update_ref,
    "cpu": "lnlm_ssm.ops.conv1d.cpu:causal_conv1d_update_cpu",
    "triton": "lnlm_ssm.ops.conv1d.triton:causal_conv1d_update_triton",
}
# The causal-conv1d package's kernels serve "cuda" when it is installed (found
# without importing it, so that importing lnlm_ssm stays light).
if importlib.util.find_spec("causal_conv1d") is not None:
    _KERNELS["cuda"] = "lnlm_ssm.ops.conv1d.cuda:causal_conv1d_cuda"
    _UPDATE_KERNELS["cuda"] = "lnlm_ssm.ops.conv1d.cuda:causal_conv1d_update_cuda"
register("causal_conv1d_fn", _KERNELS)
register("causal_conv1d_update", _UPDATE_KERNELS)


def _bind_weight(shapes: Shapes, weight, bias, activation) -> int:
    shapes.bind("weight", weight, ("dim", "width"))
    shapes.bind_optional("bias", bias, ("dim",))
    check_choice("activation", activation, ACTIVATIONS)
    if shapes["width"] < 1:
        raise ValueError(f"weight must have width >= 1, got shape {tuple(weight.shape)}")
    return shapes["width"]


def causal_conv1d_fn(
    x,
    weight,
    bias=None,
    seq_idx=None,
    initial_states=None,
    return_final_states=False,
    final_states_out=None,
    activation=None,
    *,
    backend="auto",
):
    """Causal depthwise conv1d over x ``(batch, dim, seqlen)`` with weight ``(dim, width)``.

    Returns out like x, or ``(out, final_states)`` with the last width - 1
    inputs ``(batch, dim, width - 1)``; ``final_states_out``, when given, receives them.
    """
    shapes = Shapes()
    shapes.bind("x", x, ("batch", "dim", "seqlen"))
    width = _bind_weight(shapes, weight, bias, activation)
    shapes.bind_optional("initial_states", initial_states, ("batch", "dim", width - 1))
    if seq_idx is not None:
        shapes.bind("seq_idx", seq_idx, ("batch", "seqlen"), floating=False)
        check_seq_idx(seq_idx)
    if final_states_out is not None:
        if not return_final_states:
            raise ValueError("final_states_out is only written with return_final_states=True")
        shapes.bind("final_states_out", final_states_out, ("batch", "dim", width - 1))
    kernel = resolve("causal_conv1d_fn", backend, shapes.device, dtype=x.dtype)
    # Keywords: the reference has the causal-conv1d package's positional order, the kernels their own.
    result = kernel(
        x,
        weight,
        bias,
        activation=activation,
        initial_states=initial_states,
        return_final_states=return_final_states,
        seq_idx=seq_idx,
    )
    if final_states_out is None:
        return result
    out, final_states = result
    final_states_out.copy_(final_states)
    return out, final_states_out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, *, backend="auto"):
    """Decode step(s) of the causal conv: x ``(batch, dim)`` or ``(batch, dim, seqlen)``.

    ``conv_state`` ``(batch, dim, state_len)``, state_len >= width - 1, holds the
    latest inputs and is updated in place. Returns out like x.
    """
    shapes = Shapes()
    if getattr(x, "ndim", None) == 2:
        shapes.bind("x", x, ("batch", "dim"))
    else:
        shapes.bind("x", x, ("batch", "dim", "seqlen"))
    width = _bind_weight(shapes, weight, bias, activation)
    shapes.bind("conv_state", conv_state, ("batch", "dim", "state_len"))
    if shapes["state_len"] < width - 1:
        raise ValueError(
            f"conv_state must hold at least width - 1 = {width - 1} steps, got shape {tuple(conv_state.shape)}"
        )
    kernel = resolve("causal_conv1d_update", backend, shapes.device, dtype=x.dtype)
    return kernel(x, conv_state, weight, bias, activation)
