"""Reference Mamba-2 mixer path: ``mamba_split_conv1d_scan_ref``, with mamba_ssm's name and signature.

``split_conv1d_scan`` is the composition that mamba_ssm fuses into
``mamba_split_conv1d_scan_combined``; the reference runs it on the reference
ops, the public function (``interface.py``) on the public ones.

zxbcdt ``(batch, seqlen, 2 * d_mlp + dim + conv_dim + nheads)`` is the in_proj
output, split along its last axis as::

    [ zx0 (2 * d_mlp) | z (dim) | xBC (conv_dim = dim + 2 * ngroups * dstate) | dt (nheads) ]

with ``dim = nheads * headdim`` and xBC as ``[ x (dim) | B (ngroups * dstate) | C (ngroups * dstate) ]``.
Steps:

1. xBC <- causal_conv1d(xBC) with ``activation`` (conv1d_weight ``(conv_dim, width)``);
2. y <- the SSD scan of x (heads of headdim) with Δ = softplus(dt + dt_bias) clamped to
   ``dt_limit``, B and C per group, D skip; gated by silu(z) inside the scan, or,
   with ``rmsnorm_weight``, by the gated RMSNorm (groups of dim / ngroups channels);
3. with d_mlp > 0, the parallel MLP branch silu(z0) * x0 (zx0 = [z0 | x0]) goes in front of y;
4. out <- y @ outproj_weight.T + outproj_bias when outproj_weight is given.

headdim is D's second size when D is ``(nheads, headdim)``, else the ``headdim`` argument.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from lnlm_ssm.ops.conv1d.reference import causal_conv1d_ref
from lnlm_ssm.ops.norm.reference import rms_norm_gated_ref
from lnlm_ssm.ops.ssd.reference import mamba_chunk_scan_ref
from lnlm_ssm.utils.checks import NO_DT_LIMIT


def head_layout(zxbcdt, conv1d_weight, A, D, headdim, ngroups) -> tuple[int, int, int]:
    """(dim, dstate, d_mlp) of the split, from the shapes (see the module docstring)."""
    nheads = A.shape[0]
    if D is not None and D.ndim == 2:
        headdim = D.shape[1]
    dim = nheads * headdim
    dstate = (conv1d_weight.shape[0] - dim) // (2 * ngroups)
    d_mlp = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - nheads) // 2
    return dim, dstate, d_mlp


def split_conv1d_scan(
    zxbcdt,
    conv1d_weight,
    conv1d_bias,
    dt_bias,
    A,
    D,
    chunk_size,
    initial_states,
    seq_idx,
    dt_limit,
    return_final_states,
    activation,
    rmsnorm_weight,
    rmsnorm_eps,
    outproj_weight,
    outproj_bias,
    headdim,
    ngroups,
    norm_before_gate,
    *,
    conv: Callable,
    scan: Callable,
    gated_norm: Callable,
):
    """The composition. ``conv(x, weight, bias, seq_idx, activation)`` on (batch, channels, seqlen);
    ``scan`` takes mamba_chunk_scan_combined's arguments by keyword;
    ``gated_norm(y, weight, z, eps, group_size, norm_before_gate)``."""
    dim, dstate, d_mlp = head_layout(zxbcdt, conv1d_weight, A, D, headdim, ngroups)
    headdim = dim // A.shape[0]
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_mlp, dim, dim + 2 * ngroups * dstate, A.shape[0]], dim=-1)

    xBC = conv(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx, activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    scanned = scan(
        rearrange(x, "b l (h p) -> b l h p", p=headdim),
        dt,
        A,
        rearrange(B, "b l (g n) -> b l g n", g=ngroups),
        rearrange(C, "b l (g n) -> b l g n", g=ngroups),
        chunk_size,
        D=D,
        z=None if rmsnorm_weight is not None else rearrange(z, "b l (h p) -> b l h p", p=headdim),
        dt_bias=dt_bias,
        dt_softplus=True,
        dt_limit=dt_limit,
        initial_states=initial_states,
        seq_idx=seq_idx,
        return_final_states=return_final_states,
    )
    y, final_states = scanned if return_final_states else (scanned, None)
    y = rearrange(y, "b l h p -> b l (h p)")
    if rmsnorm_weight is not None:
        y = gated_norm(y, rmsnorm_weight, z, rmsnorm_eps, dim // ngroups, norm_before_gate)
    if d_mlp > 0:
        z0, x0 = zx0.chunk(2, dim=-1)
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final_states) if return_final_states else y


def mamba_split_conv1d_scan_ref(
    zxbcdt,
    conv1d_weight,
    conv1d_bias,
    dt_bias,
    A,
    D,
    chunk_size,
    dt_limit=NO_DT_LIMIT,
    activation="silu",
    rmsnorm_weight=None,
    rmsnorm_eps=1e-6,
    outproj_weight=None,
    outproj_bias=None,
    headdim=None,
    ngroups=1,
    norm_before_gate=True,
):
    """mamba_ssm's ``mamba_split_conv1d_scan_ref`` on the reference ops (see the module docstring).

    Unlike mamba_ssm's, it also takes the MLP branch (d_mlp > 0).
    """
    return split_conv1d_scan(
        zxbcdt,
        conv1d_weight,
        conv1d_bias,
        dt_bias,
        A,
        D,
        chunk_size,
        None,
        None,
        dt_limit,
        False,
        activation,
        rmsnorm_weight,
        rmsnorm_eps,
        outproj_weight,
        outproj_bias,
        headdim,
        ngroups,
        norm_before_gate,
        conv=lambda x, w, b, seq_idx, act: causal_conv1d_ref(x, w, b, activation=act),
        scan=mamba_chunk_scan_ref,
        gated_norm=lambda y, w, z, eps, group, before: rms_norm_gated_ref(
            y, w, None, z=z, eps=eps, group_size=group, norm_before_gate=before
        ),
    )
