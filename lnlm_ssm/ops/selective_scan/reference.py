"""Reference selective scan (Mamba-1): the specification every fast kernel is tested against.

Glossary (mamba_ssm's layout):

======  =========================================  ==============================
symbol  shape                                      meaning
======  =========================================  ==============================
u       (batch, dim, seqlen)                       input sequence
delta   (batch, dim, seqlen)                       step size Δ, one per channel and step
A       (dim, dstate)                              continuous-time state matrix (diagonal, real)
B, C    (batch, dstate, seqlen) or                 input and output projections; with ngroups,
        (batch, ngroups, dstate, seqlen)           group g serves channels [g*dim/ngroups, (g+1)*dim/ngroups)
D       (dim,)                                     skip connection
z       (batch, dim, seqlen)                       gate
h       (batch, dim, dstate)                       state; ``initial_state`` is h before step 0
======  =========================================  ==============================

Steps (Mamba paper, Algorithm 2, with zero-order-hold for A and Euler for B):

1. Δ <- Δ + delta_bias; Δ <- softplus(Δ) if delta_softplus
2. for t in 0..seqlen-1:
       h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t
       y_t = C_t · h_t
3. y <- y + D ⊙ u;  y <- y ⊙ silu(z) if z is given

Math runs in fp32 (float64 when u is float64). y is returned in u's dtype, the
last state in the math dtype. This is the plain sequential PyTorch scan the Mamba
paper compares its fused kernel against; every tensor op is differentiable, so
gradients flow to all float inputs, to ``initial_state``, and through the last state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from lnlm_ssm.utils.dtypes import math_dtype


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    *,
    initial_state=None,
):
    out_dtype = u.dtype
    compute = math_dtype(u.dtype)
    batch, dim, _ = u.shape
    dstate = A.shape[-1]

    u = u.to(compute)
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    # Ungrouped B/C is the one-group case. The scan splits the channels as dim = (g c):
    # group g's B and C serve its c = dim / ngroups channels.
    B = (B if B.ndim == 4 else B.unsqueeze(1)).to(compute)
    C = (C if C.ndim == 4 else C.unsqueeze(1)).to(compute)
    ngroups = B.shape[1]

    # Discretise every step up front: both are (batch, ngroups, dim / ngroups, seqlen, dstate).
    decay = torch.exp(delta.unsqueeze(-1) * A.to(compute)[:, None, :])
    decay = rearrange(decay, "b (g c) l n -> b g c l n", g=ngroups)
    drive = torch.einsum("bgcl,bgnl->bgcln", rearrange(delta * u, "b (g c) l -> b g c l", g=ngroups), B)

    h = u.new_zeros(batch, dim, dstate) if initial_state is None else initial_state.to(compute)
    h = rearrange(h, "b (g c) n -> b g c n", g=ngroups)
    ys = []
    # unbind, not indexing: the backward of x[..., t, :] builds a zero tensor of x's
    # full size at every step, which makes the backward quadratic in seqlen.
    for decay_t, drive_t, C_t in zip(decay.unbind(3), drive.unbind(3), C.unbind(-1)):
        h = decay_t * h + drive_t
        ys.append(torch.einsum("bgcn,bgn->bgc", h, C_t))
    y = rearrange(torch.stack(ys, dim=-1), "b g c l -> b (g c) l") if ys else u.new_zeros(batch, dim, 0)
    h = rearrange(h, "b g c n -> b (g c) n")

    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(out_dtype)
    return (y, h) if return_last_state else y
