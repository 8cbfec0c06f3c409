"""Reference decode step: one token through the selective SSM, updating the state in place.

Glossary (canonical Mamba-2 layout, see ``shapes.py``): b batch, h heads, p headdim,
n dstate, g groups (each group's B and C serve h/g consecutive heads).

Steps, for every (b, h, p):

1. dt <- dt + dt_bias; dt <- softplus(dt) if dt_softplus
2. state <- exp(dt * A) * state + dt * B * x           (the discretised recurrence)
3. y <- sum_n state * C  (+ D * x)  (* silu(z))

Math runs in fp32 (float64 when x is float64); y is returned in x's dtype and
the state is written back in its own dtype.
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
