"""Validate the arguments of the decode step and bring them to one canonical form.

Two layouts are accepted, as in mamba_ssm:

=========  ==========================  =====================================
argument   Mamba-1                     Mamba-2
=========  ==========================  =====================================
state      (batch, dim, dstate)        (batch, nheads, headdim, dstate)
x, z       (batch, dim)                (batch, nheads, headdim)
dt         (batch, dim)                (batch, nheads, headdim) or (batch, nheads)
A          (dim, dstate)               (nheads, headdim, dstate) or (nheads,)
B, C       (batch, dstate) or          (batch, ngroups, dstate)
           (batch, ngroups, dstate)
D, dt_bias (dim,)                      (nheads, headdim) or (nheads,)
=========  ==========================  =====================================

With ``state_batch_indices`` (int32 or int64, ``(batch,)``), ``state`` is a pool:
its first dimension is ``pool``, not ``batch``, and batch row b steps the slot
``state[state_batch_indices[b]]``. A negative index marks a padding row (as in
mamba_ssm: its output is 0 and no slot is touched); the others must be distinct
slots in ``[0, pool)``, because two rows updating one slot in place would race.

The canonical form is the Mamba-2 layout with every optional broadcast
expanded (as stride-0 views, so nothing is copied and ``state`` stays a view of
the caller's tensor): a Mamba-1 call is a Mamba-2 call with headdim 1. The
indices need no canonical form and are not part of it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from lnlm_ssm.ops._checks import Shapes, check_divisible


class Canonical(NamedTuple):
    state: torch.Tensor  # (batch, nheads, headdim, dstate)
    x: torch.Tensor  # (batch, nheads, headdim)
    dt: torch.Tensor  # (batch, nheads, headdim)
    A: torch.Tensor  # (nheads, headdim, dstate)
    B: torch.Tensor  # (batch, ngroups, dstate)
    C: torch.Tensor  # (batch, ngroups, dstate)
    D: Optional[torch.Tensor]  # (nheads, headdim)
    z: Optional[torch.Tensor]  # (batch, nheads, headdim)
    dt_bias: Optional[torch.Tensor]  # (nheads, headdim)


def _head_param(shapes: Shapes, arg: str, value, extra: tuple[str, ...] = ()) -> Optional[torch.Tensor]:
    """A per-head parameter given either per head ``(nheads,)`` or in full ``(nheads, headdim, *extra)``."""
    if value is None:
        return None
    full = ("nheads", "headdim") + extra
    if isinstance(value, torch.Tensor) and value.ndim == 1:
        value = shapes.bind(arg, value, ("nheads",))
        return value.view(-1, *([1] * (len(full) - 1))).expand(*(shapes[n] for n in full))
    return shapes.bind(arg, value, full)


def check_state_batch_indices(indices: torch.Tensor, pool: int) -> None:
    """Padding rows are negative; the other indices are distinct slots in ``[0, pool)``.

    The check reads the values, so it must not wait for a GPU: on CPU tensors
    (outside torch.compile) it raises a ValueError that names the bad index;
    elsewhere it is one ``torch._assert_async`` on the device, which fails at
    the next synchronisation.
    """
    if indices.numel() == 0:
        return
    slots = indices.sort().values
    repeated = (slots[1:] == slots[:-1]) & (slots[1:] >= 0)
    if indices.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool((slots[-1] >= pool).item()):
            raise ValueError(
                f"state_batch_indices must be slots in [0, pool={pool}) of state, or negative for a padding row; "
                f"got {slots[-1].item()}"
            )
        if bool(repeated.any().item()):
            slot = slots[1:][repeated][0].item()
            raise ValueError(
                f"state_batch_indices must not repeat a slot (two rows would update it in place at once); "
                f"got {slot} more than once"
            )
    else:
        valid = (slots[-1] < pool) & ~repeated.any()
        torch._assert_async(
            valid, f"state_batch_indices must be distinct slots in [0, pool={pool}) of state, or negative for padding"
        )


def _bind_indices(shapes: Shapes, indices) -> torch.Tensor:
    indices = shapes.bind("state_batch_indices", indices, ("batch",), floating=False)
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"state_batch_indices must have dtype int32 or int64, got {indices.dtype}")
    check_state_batch_indices(indices, shapes["pool"])
    return indices


def canonicalize(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, state_batch_indices=None) -> Canonical:
    """Check the arguments (errors name the argument) and return their canonical views."""
    shapes = Shapes()
    # With indices, the state's rows are slots of a pool and not the batch rows.
    rows = "batch" if state_batch_indices is None else "pool"
    if isinstance(state, torch.Tensor) and state.ndim == 3:
        # Mamba-1: every channel is a head of size 1.
        state = shapes.bind("state", state, (rows, "dim", "dstate")).unsqueeze(2)
        x = shapes.bind("x", x, ("batch", "dim")).unsqueeze(-1)
        dt = shapes.bind("dt", dt, ("batch", "dim")).unsqueeze(-1)
        A = shapes.bind("A", A, ("dim", "dstate")).unsqueeze(1)
        if isinstance(B, torch.Tensor) and B.ndim == 2:
            B = shapes.bind("B", B, ("batch", "dstate")).unsqueeze(1)
            C = shapes.bind("C", C, ("batch", "dstate")).unsqueeze(1)
        else:
            B = shapes.bind("B", B, ("batch", "ngroups", "dstate"))
            C = shapes.bind("C", C, ("batch", "ngroups", "dstate"))
        D = None if D is None else shapes.bind("D", D, ("dim",)).unsqueeze(-1)
        z = None if z is None else shapes.bind("z", z, ("batch", "dim")).unsqueeze(-1)
        dt_bias = None if dt_bias is None else shapes.bind("dt_bias", dt_bias, ("dim",)).unsqueeze(-1)
        check_divisible("dim", shapes["dim"], "ngroups", B.shape[1])
    elif isinstance(state, torch.Tensor) and state.ndim == 4:
        state = shapes.bind("state", state, (rows, "nheads", "headdim", "dstate"))
        x = shapes.bind("x", x, ("batch", "nheads", "headdim"))
        if isinstance(dt, torch.Tensor) and dt.ndim == 2:
            dt = shapes.bind("dt", dt, ("batch", "nheads")).unsqueeze(-1).expand_as(x)
        else:
            dt = shapes.bind("dt", dt, ("batch", "nheads", "headdim"))
        A = _head_param(shapes, "A", A, ("dstate",))
        B = shapes.bind("B", B, ("batch", "ngroups", "dstate"))
        C = shapes.bind("C", C, ("batch", "ngroups", "dstate"))
        D = _head_param(shapes, "D", D)
        z = shapes.bind_optional("z", z, ("batch", "nheads", "headdim"))
        dt_bias = _head_param(shapes, "dt_bias", dt_bias)
        check_divisible("nheads", shapes["nheads"], "ngroups", shapes["ngroups"])
    elif isinstance(state, torch.Tensor):
        raise ValueError(
            f"state must have 3 dimensions ({rows}, dim, dstate) or 4 dimensions "
            f"({rows}, nheads, headdim, dstate), got shape {tuple(state.shape)}"
        )
    else:
        raise TypeError(f"state must be a torch.Tensor, got {type(state).__name__}")
    if z is not None and z.dtype != x.dtype:
        raise TypeError(f"z must have the dtype of x ({x.dtype}), got {z.dtype}")
    if state_batch_indices is not None:
        _bind_indices(shapes, state_batch_indices)
    return Canonical(state, x, dt, A, B, C, D, z, dt_bias)
