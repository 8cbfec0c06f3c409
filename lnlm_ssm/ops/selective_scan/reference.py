"""Reference selective scan (Mamba-1): the specification every fast kernel is tested against.

Glossary (mamba_ssm's layout):

======  =========================================  ==============================
symbol  shape                                      meaning
======  =========================================  ==============================
u       (batch, dim, seqlen)                       input sequence
delta   (batch, dim, seqlen)                       step size Δ, one per channel and step
A       (dim, dstate)                              continuous-time state matrix (diagonal), real
                                                   or complex (S4D-style)
B, C    time-varying: (batch, dstate, seqlen) or   input and output projections; with ngroups,
        (batch, ngroups, dstate, seqlen);          group g serves channels [g*dim/ngroups, (g+1)*dim/ngroups).
        time-invariant: (dim, dstate)              B and C are time-varying or not independently
D       (dim,)                                     skip connection
z       (batch, dim, seqlen)                       gate
h       (batch, dim, dstate)                       state; ``initial_state`` is h before step 0
======  =========================================  ==============================

Complex A (as in mamba_ssm): the state h is complex; a time-invariant B or C is a
complex (dim, dstate) tensor; a time-varying one is real, with its last axis 2*seqlen
holding (real, imaginary) pairs: step t is ``B[..., 2t] + i B[..., 2t + 1]``. Each
complex state stands for a conjugate pair, so y_t is ``2 Re(C_t · h_t)``.

Steps (Mamba paper, Algorithm 2, with zero-order-hold for A and Euler for B):

1. Δ <- Δ + delta_bias; Δ <- softplus(Δ) if delta_softplus
2. for t in 0..seqlen-1:
       h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t
       y_t = C_t · h_t  (2 Re(C_t · h_t) for complex A)
3. y <- y + D ⊙ u;  y <- y ⊙ silu(z) if z is given

Math runs in fp32 (float64 when u is float64; complex64 or complex128 for
complex A). y is returned in u's dtype, the last state in the math dtype. This is
the plain sequential PyTorch scan the Mamba paper compares its fused kernel
against; every tensor op is differentiable, so gradients flow to all float inputs,
to ``initial_state``, and through the last state (for complex tensors, PyTorch's
convention: the gradient of x + iy is dL/dx + i dL/dy).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from einops import rearrange

from lnlm_ssm.utils.dtypes import math_dtype


def _per_channel(M: torch.Tensor, dim: int, complex_A: bool, compute: torch.dtype) -> torch.Tensor:
    """B or C as (batch or 1, dim, seqlen or 1, dstate) in ``compute``: broadcastable to every step of every channel."""
    if M.ndim == 2:  # time-invariant (dim, dstate)
        return M.to(compute)[None, :, None, :]
    if complex_A:  # the last axis holds (real, imaginary) pairs
        M = torch.view_as_complex(rearrange(M.to(compute.to_real()), "... (l two) -> ... l two", two=2).contiguous())
    M = M.to(compute) if M.ndim == 4 else M.to(compute).unsqueeze(1)
    # Group g serves channels [g*c, (g+1)*c), c = dim / ngroups.
    return rearrange(M, "b g n l -> b g l n").repeat_interleave(dim // M.shape[1], dim=1)


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
    real = math_dtype(u.dtype)
    # The state's dtype: complex of the math precision when A is complex.
    compute = (torch.complex128 if real == torch.float64 else torch.complex64) if A.is_complex() else real
    batch, dim, seqlen = u.shape
    dstate = A.shape[-1]

    u = u.to(real)
    delta = delta.to(real)
    if delta_bias is not None:
        delta = delta + delta_bias.to(real)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    B = _per_channel(B, dim, A.is_complex(), compute)
    C = _per_channel(C, dim, A.is_complex(), compute)

    # Discretise every step up front: both are (batch, dim, seqlen, dstate).
    decay = torch.exp(delta.unsqueeze(-1) * A.to(compute)[:, None, :])
    drive = (delta * u).unsqueeze(-1) * B

    h = u.new_zeros(batch, dim, dstate, dtype=compute) if initial_state is None else initial_state.to(compute)
    # unbind, not indexing: the backward of x[..., t, :] builds a zero tensor of x's
    # full size at every step, which makes the backward quadratic in seqlen.
    C_steps = C.unbind(2) if C.shape[2] == seqlen else itertools.repeat(C[:, :, 0])
    ys = []
    for decay_t, drive_t, C_t in zip(decay.unbind(2), drive.unbind(2), C_steps):
        h = decay_t * h + drive_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0, dtype=compute)
    if y.is_complex():
        y = 2 * y.real

    if D is not None:
        y = y + u * D.to(real)[:, None]
    if z is not None:
        y = y * F.silu(z.to(real))
    y = y.to(out_dtype)
    return (y, h) if return_last_state else y
