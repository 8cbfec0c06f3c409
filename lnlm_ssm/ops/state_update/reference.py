"""Reference decode step: one token through the selective SSM, updating the state in place.

Glossary (canonical Mamba-2 layout, see ``shapes.py``): b batch, h heads, p headdim,
n dstate, g groups (each group's B and C serve h/g consecutive heads).

Steps, for every (b, h, p):

1. dt <- dt + dt_bias; dt <- softplus(dt) if dt_softplus
2. state <- exp(dt * A) * state + dt * B * x           (the discretised recurrence)
3. y <- sum_n state * C  (+ D * x)  (* silu(z))

Math runs in fp32 (float64 when x is float64); y is returned in x's dtype and
the state is written back in its own dtype.

``selective_state_update_ref`` has mamba_ssm's signature, which has no
``state_batch_indices``. The public function's ``state_batch_indices`` (``state``
is then a pool of slots, see ``shapes.py``) is specified by
``selective_state_update_pooled_ref``: gather the slots of the rows that have
one, take the step above on them, scatter them back; a padding row (negative
index) gets y = 0 and touches no slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat

from lnlm_ssm.ops.state_update.shapes import canonicalize
from lnlm_ssm.utils.dtypes import math_dtype


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    s = canonicalize(state, x, dt, A, B, C, D, z, dt_bias)
    compute = math_dtype(s.x.dtype)
    heads_per_group = s.x.shape[1] // s.B.shape[1]

    dt = s.dt.to(compute)
    if s.dt_bias is not None:
        dt = dt + s.dt_bias.to(compute)
    if dt_softplus:
        dt = F.softplus(dt)
    # Heads split as (g r): group g's B and C serve its r heads (the 1 broadcasts over headdim).
    B = repeat(s.B.to(compute), "b g n -> b (g r) 1 n", r=heads_per_group)
    C = repeat(s.C.to(compute), "b g n -> b (g r) 1 n", r=heads_per_group)
    x = s.x.to(compute)

    decay = torch.exp(dt[..., None] * s.A.to(compute))
    new_state = decay * s.state.to(compute) + (dt * x)[..., None] * B
    y = (new_state * C).sum(-1)
    if s.D is not None:
        y = y + x * s.D.to(compute)
    if s.z is not None:
        y = y * F.silu(s.z.to(compute))
    s.state.copy_(new_state)
    y = y.to(s.x.dtype)
    # A Mamba-1 call gets y as (batch, dim), like its x.
    return y.squeeze(-1) if state.ndim == 3 else y


def selective_state_update_pooled_ref(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None
):
    """The step on the slots of a pool that ``state_batch_indices`` names: gather, step, scatter."""
    if state_batch_indices is None:
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    canonicalize(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)  # the checks only
    # Every per-row argument has the batch first, in either layout.
    live = state_batch_indices >= 0
    slots = state_batch_indices[live]
    rows = state[slots]  # gather: a copy of the live rows' slots
    y_live = selective_state_update_ref(
        rows, x[live], dt[live], A, B[live], C[live], D, None if z is None else z[live], dt_bias, dt_softplus
    )
    state[slots] = rows  # scatter: the slots are distinct
    y = x.new_zeros(x.shape)
    y[live] = y_live
    return y
