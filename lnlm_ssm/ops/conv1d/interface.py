"""Public causal conv1d, as in causal-conv1d: ``causal_conv1d_fn``, ``causal_conv1d_update``
and ``causal_conv1d_varlen_states``."""

from __future__ import annotations

import importlib.util

import torch

from lnlm_ssm.ops._backends import register, resolve
from lnlm_ssm.ops._checks import Shapes
from lnlm_ssm.ops.conv1d.reference import (
    ACTIVATIONS,
    causal_conv1d_ref,
    causal_conv1d_update_indexed_ref,
    causal_conv1d_varlen_states_ref,
)
from lnlm_ssm.utils.checks import check_choice, check_nonnegative_int

_KERNELS = {
    "reference": causal_conv1d_ref,
    "cpu": "lnlm_ssm.ops.conv1d.cpu:causal_conv1d_cpu",
    "triton": "lnlm_ssm.ops.conv1d.triton:causal_conv1d_triton",
}
_UPDATE_KERNELS = {
    "reference": causal_conv1d_update_indexed_ref,
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
# A gather: as fast as it gets in PyTorch, on every device.
register("causal_conv1d_varlen_states", {"reference": causal_conv1d_varlen_states_ref})

_INDEX_DTYPES = (torch.int32, torch.int64)


def _bind_weight(shapes: Shapes, weight, bias, activation) -> int:
    shapes.bind("weight", weight, ("dim", "width"))
    shapes.bind_optional("bias", bias, ("dim",))
    check_choice("activation", activation, ACTIVATIONS)
    if shapes["width"] < 1:
        raise ValueError(f"weight must have width >= 1, got shape {tuple(weight.shape)}")
    return shapes["width"]


def _bind_index(shapes: Shapes, arg: str, value, layout) -> torch.Tensor:
    tensor = shapes.bind(arg, value, layout, floating=False)
    if tensor.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{arg} must have dtype int32 or int64, got {tensor.dtype}")
    return tensor


def _readable(values: torch.Tensor, gpu: bool) -> bool:
    """Whether a check may read ``values`` back now: never while torch.compile traces or a CUDA graph is
    captured, and on a GPU only when ``gpu`` (the sync is worth it for a prefill, not for every decode step)."""
    if torch.compiler.is_compiling():
        return False
    if values.device.type == "cpu":
        return True
    return gpu and not (values.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _refuse_values(
    values: torch.Tensor, bad: torch.Tensor, rule: str, *, at_index: bool = True, gpu: bool = False
) -> None:
    """Raise ``ValueError(rule, got ...)`` if any entry of the bool tensor ``bad`` (shaped like ``values``) is set;
    the message shows the first such value of ``values`` and, with ``at_index``, where it is.

    Where the values cannot be read back (see ``_readable``) the rule is a
    device-side assertion instead, as for token ids in ``layers/embedding.py``.
    """
    if _readable(values, gpu):
        if bool(bad.any()):
            at = tuple(int(i) for i in bad.nonzero()[0])
            where = f" at index {at if len(at) > 1 else at[0]}" if at_index else ""
            raise ValueError(f"{rule}, got {int(values[at])}{where}")
    else:
        torch._assert_async(~bad.any(), rule)


def _check_seq_idx(seq_idx: torch.Tensor, with_states: bool) -> None:
    """Negative ids are padding; the others must not decrease along seqlen (padding in between aside)."""
    if with_states:
        _refuse_values(
            seq_idx,
            seq_idx < 0,
            "seq_idx must not mark padding (negative ids) together with initial_states or return_final_states "
            "(causal-conv1d refuses seq_idx with either)",
            gpu=True,
        )
    if seq_idx.shape[-1] > 1:
        _refuse_values(
            seq_idx,
            (seq_idx >= 0) & (seq_idx < seq_idx.cummax(dim=-1).values),
            "seq_idx must be non-decreasing along seqlen apart from padding (negative ids): "
            "one run of equal ids per packed sequence",
            gpu=True,
        )


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
    ``seq_idx`` (batch, seqlen) integer ids of packed sequences: a step sees only
    the inputs of its own sequence, and a negative id marks padding, whose output
    is 0. Unlike causal-conv1d, seq_idx goes with initial_states (the row's first
    sequence starts from them) and return_final_states, but not with padding then.
    """
    shapes = Shapes()
    shapes.bind("x", x, ("batch", "dim", "seqlen"))
    width = _bind_weight(shapes, weight, bias, activation)
    shapes.bind_optional("initial_states", initial_states, ("batch", "dim", width - 1))
    if seq_idx is not None:
        shapes.bind("seq_idx", seq_idx, ("batch", "seqlen"), floating=False)
        _check_seq_idx(seq_idx, with_states=initial_states is not None or bool(return_final_states))
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


def causal_conv1d_update(
    x,
    conv_state,
    weight,
    bias=None,
    activation=None,
    cache_seqlens=None,
    conv_state_indices=None,
    *,
    backend="auto",
):
    """Decode step(s) of the causal conv: x ``(batch, dim)`` or ``(batch, dim, seqlen)``.

    ``conv_state`` ``(batch, dim, state_len)``, state_len >= width - 1, holds the
    latest inputs and is updated in place. Returns out like x.

    ``cache_seqlens`` (batch,) int32/int64 >= 0: conv_state is a circular buffer whose
    row b takes its next input at slot cache_seqlens[b] mod state_len (the caller
    advances it). ``conv_state_indices`` (batch,) int32/int64: conv_state is a pool
    ``(pool, dim, state_len)`` and batch row b reads and updates its slot
    conv_state_indices[b]; a negative index is a padding row, whose output is 0 and
    which touches no slot. Two rows may not share a slot. On a GPU these rules on
    the index values are device-side assertions: checking them costs no sync.
    """
    shapes = Shapes()
    if getattr(x, "ndim", None) == 2:
        shapes.bind("x", x, ("batch", "dim"))
    else:
        shapes.bind("x", x, ("batch", "dim", "seqlen"))
    width = _bind_weight(shapes, weight, bias, activation)
    shapes.bind("conv_state", conv_state, ("pool" if conv_state_indices is not None else "batch", "dim", "state_len"))
    if shapes["state_len"] < width - 1:
        raise ValueError(
            f"conv_state must hold at least width - 1 = {width - 1} steps, got shape {tuple(conv_state.shape)}"
        )
    if cache_seqlens is not None:
        _bind_index(shapes, "cache_seqlens", cache_seqlens, ("batch",))
        _refuse_values(cache_seqlens, cache_seqlens < 0, "cache_seqlens must be >= 0")
    if conv_state_indices is not None:
        _bind_index(shapes, "conv_state_indices", conv_state_indices, ("batch",))
        pool = shapes["pool"]
        _refuse_values(
            conv_state_indices,
            conv_state_indices >= pool,
            f"conv_state_indices must be < the pool size conv_state.shape[0] = {pool} (negative: padding)",
        )
        ordered = conv_state_indices.sort().values
        _refuse_values(
            ordered[1:],
            (ordered[1:] == ordered[:-1]) & (ordered[1:] >= 0),
            "conv_state_indices must not repeat a slot (two rows would update the same state)",
            at_index=False,
        )
    kernel = resolve("causal_conv1d_update", backend, shapes.device, dtype=x.dtype)
    return kernel(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)


def causal_conv1d_varlen_states(x, cu_seqlens, state_len, *, backend="auto"):
    """The last ``state_len`` inputs of each packed sequence, as conv states ``(batch, dim, state_len)``.

    x ``(total_tokens, dim)`` holds the sequences back to back, sequence b in
    ``x[cu_seqlens[b] : cu_seqlens[b + 1]]``; ``cu_seqlens`` (batch + 1,) int32/int64
    is non-decreasing within [0, total_tokens]. A sequence shorter than state_len is
    right-aligned after zeros. The result is in x's dtype with dim as its fastest
    axis, as causal-conv1d returns it; see ``causal_conv1d_varlen_states_ref``.
    """
    shapes = Shapes()
    shapes.bind("x", x, ("total_tokens", "dim"))
    _bind_index(shapes, "cu_seqlens", cu_seqlens, ("batch + 1",))
    check_nonnegative_int("state_len", state_len)
    if shapes["batch + 1"] < 1:
        raise ValueError("cu_seqlens must hold at least one offset (batch + 1 >= 1), got shape (0,)")
    total = shapes["total_tokens"]
    _refuse_values(
        cu_seqlens,
        (cu_seqlens < 0) | (cu_seqlens > total),
        f"cu_seqlens must lie in [0, total_tokens = {total}]",
        gpu=True,
    )
    _refuse_values(
        cu_seqlens,
        cu_seqlens < cu_seqlens.cummax(dim=0).values,
        "cu_seqlens must be non-decreasing (offsets of sequences)",
        gpu=True,
    )
    kernel = resolve("causal_conv1d_varlen_states", backend, shapes.device, dtype=x.dtype)
    return kernel(x, cu_seqlens, state_len)
