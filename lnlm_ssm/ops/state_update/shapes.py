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

The canonical form is the Mamba-2 layout with every optional broadcast
expanded (as stride-0 views, so nothing is copied and ``state`` stays a view of
the caller's tensor): a Mamba-1 call is a Mamba-2 call with headdim 1.
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


def canonicalize(state, x, dt, A, B, C, D=None, z=None, dt_bias=None) -> Canonical:
    """Check the arguments (errors name the argument) and return their canonical views."""
    shapes = Shapes()
    if isinstance(state, torch.Tensor) and state.ndim == 3:
        # Mamba-1: every channel is a head of size 1.
        state = shapes.bind("state", state, ("batch", "dim", "dstate")).unsqueeze(2)
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
        state = shapes.bind("state", state, ("batch", "nheads", "headdim", "dstate"))
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
            "state must have 3 dimensions (batch, dim, dstate) or 4 dimensions "
            f"(batch, nheads, headdim, dstate), got shape {tuple(state.shape)}"
        )
    else:
        raise TypeError(f"state must be a torch.Tensor, got {type(state).__name__}")
    if z is not None and z.dtype != x.dtype:
        raise TypeError(f"z must have the dtype of x ({x.dtype}), got {z.dtype}")
    return Canonical(state, x, dt, A, B, C, D, z, dt_bias)
