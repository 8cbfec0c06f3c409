"""Reference Mamba-1 mixer path: ``mamba_inner_ref``, with mamba_ssm's name and signature.

``mamba_inner`` is the composition that mamba_ssm fuses into one autograd
function (conv, projections, scan, gate, out projection); both
``mamba_inner_ref`` (on the reference ops) and ``mamba_inner_fn`` (on the
public ops, ``interface.py``) are this composition, so they differ only in the
kernels underneath.

Glossary:

==================  ===================================  ==========================================
argument            shape                                meaning
==================  ===================================  ==========================================
xz                  (batch, 2 * dim, seqlen)             in_proj output: x is the first dim channels, z the rest
conv1d_weight       (dim, 1, width)                      depthwise causal conv (silu after it)
x_proj_weight       (dt_rank + 2 * dstate', dim)         x -> [Δ low rank | B | C]; dstate' = dstate, or
                                                         2 * dstate for complex A (interleaved re/im)
delta_proj_weight   (dim, dt_rank)                       Δ low rank -> Δ
out_proj_weight     (d_model, dim)                       y -> output
A                   (dim, dstate)                        real, or complex (S4D)
B, C                None, or (dim, dstate)               None: taken from x_proj (time-varying);
                                                         given: time-invariant
b/c/dt_rms_weight   (dstate,), (dstate,), (dim,)         optional RMSNorms of B, C and Δ (eps b_c_dt_rms_eps)
==================  ===================================  ==========================================

Returns (batch, seqlen, d_model).
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from einops import rearrange

from lnlm_ssm.ops.conv1d.reference import causal_conv1d_ref
from lnlm_ssm.ops.norm.reference import rms_norm_ref
from lnlm_ssm.ops.selective_scan.reference import selective_scan_ref


def _norm_channels(t, weight, eps, rms_norm: Callable):
    """RMSNorm of (batch, channels, seqlen) over its channels."""
    if weight is None:
        return t
    return rms_norm(t.transpose(1, 2), weight, eps).transpose(1, 2)


def mamba_inner(
    xz,
    conv1d_weight,
    conv1d_bias,
    x_proj_weight,
    delta_proj_weight,
    out_proj_weight,
    out_proj_bias,
    A,
    B,
    C,
    D,
    delta_bias,
    B_proj_bias,
    C_proj_bias,
    delta_softplus,
    b_rms_weight,
    c_rms_weight,
    dt_rms_weight,
    b_c_dt_rms_eps,
    *,
    conv: Callable,
    scan: Callable,
    rms_norm: Callable,
):
    """The composition; ``conv(x, weight, bias)`` applies silu, ``rms_norm(x, weight, eps)`` normalises the last dim."""
    dt_rank = delta_proj_weight.shape[1]
    # Complex A reads a time-varying B or C as (re, im) pairs: twice the columns, then twice the steps.
    pairs = 2 if A.is_complex() else 1
    dstate = A.shape[-1] * pairs

    x, z = xz.chunk(2, dim=1)
    x = conv(x, rearrange(conv1d_weight, "d 1 w -> d w"), conv1d_bias)

    # 1. One projection gives Δ's low-rank part and, when not given, B and C.
    x_dbl = F.linear(rearrange(x, "b d l -> b l d"), x_proj_weight)
    delta = rearrange(F.linear(x_dbl[..., :dt_rank], delta_proj_weight), "b l d -> b d l")
    columns = dt_rank

    def time_varying(bias):
        nonlocal columns
        t = x_dbl[..., columns : columns + dstate]
        columns += dstate
        if bias is not None:
            t = t + bias
        return rearrange(t, "b l (n two) -> b n (l two)", two=pairs)

    if B is None:
        B = time_varying(B_proj_bias)
    if C is None:
        C = time_varying(C_proj_bias)

    # 2. The optional RMSNorms (Falcon-Mamba style) act on the time-varying B and C, and on Δ.
    if B.ndim == 3:
        B = _norm_channels(B, b_rms_weight, b_c_dt_rms_eps, rms_norm)
    if C.ndim == 3:
        C = _norm_channels(C, c_rms_weight, b_c_dt_rms_eps, rms_norm)
    delta = _norm_channels(delta, dt_rms_weight, b_c_dt_rms_eps, rms_norm)

    # 3. Scan, gated by silu(z), then the output projection.
    y = scan(x, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return F.linear(rearrange(y, "b d l -> b l d"), out_proj_weight, out_proj_bias)


def mamba_inner_ref(
    xz,
    conv1d_weight,
    conv1d_bias,
    x_proj_weight,
    delta_proj_weight,
    out_proj_weight,
    out_proj_bias,
    A,
    B=None,
    C=None,
    D=None,
    delta_bias=None,
    B_proj_bias=None,
    C_proj_bias=None,
    delta_softplus=True,
):
    """mamba_ssm's ``mamba_inner_ref``, on the reference ops (see the module docstring).

    Unlike mamba_ssm's, it honours ``delta_softplus`` (theirs always applies softplus).
    """
    return mamba_inner(
        xz,
        conv1d_weight,
        conv1d_bias,
        x_proj_weight,
        delta_proj_weight,
        out_proj_weight,
        out_proj_bias,
        A,
        B,
        C,
        D,
        delta_bias,
        B_proj_bias,
        C_proj_bias,
        delta_softplus,
        None,
        None,
        None,
        1e-6,
        conv=lambda x, w, b: causal_conv1d_ref(x, w, b, activation="silu"),
        scan=selective_scan_ref,
        rms_norm=lambda x, w, eps: rms_norm_ref(x, w, None, eps=eps),
    )
