"""Mamba-1 selective scan on the GPU: the CUDA kernels of ``csrc/cuda/selective_scan/``.

Same signature as ``selective_scan_ref`` (real A only: the interface sends
complex A elsewhere). u, delta and z keep their dtype (float32, float16 or
bfloat16) and strides; A, B, C, D, delta_bias and the states go to the kernel in
float32, a time-varying B or C as ``(batch, ngroups, dstate, seqlen)``, a
time-invariant one as it is, ``(dim, dstate)``.
Autograd is the Function shared with the cpu backend (``extension.py``). The
forward saves the state entering every ``CHECKPOINT_EVERY`` steps, (batch,
dim, ceil(seqlen / CHECKPOINT_EVERY), dstate) in float32.

The ops' schemas and fake implementations come from the CPU side: importing
``extension`` loads ``lnlm_ssm._C``; ``lnlm_ssm._cuda`` only adds the CUDA
kernels to those schemas, so it is imported after.
"""

from __future__ import annotations

import importlib

import torch

from lnlm_ssm.ops.selective_scan.extension import SelectiveScan  # loads lnlm_ssm._C: it defines the schemas

importlib.import_module("lnlm_ssm._cuda")  # registers the CUDA kernels

# A multiple of 64 up to 256 (kSelectiveScanCheckpointQuantum, ...MaxCheckpointEvery
# in selective_scan.h). With dstate 16 the checkpoints are 1/16 of u's elements.
CHECKPOINT_EVERY = 256


def _f32(t):
    return None if t is None else t.to(torch.float32)


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """(batch, dstate, seqlen) or (batch, ngroups, dstate, seqlen) -> float32 (batch, ngroups, dstate, seqlen).

    A time-invariant (dim, dstate) one stays 2-D.
    """
    return (t if t.ndim != 3 else t.unsqueeze(1)).to(torch.float32)


def selective_scan_cuda(
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
    out, last_state = SelectiveScan.apply(
        u,
        delta,
        _f32(A),
        _grouped(B),
        _grouped(C),
        _f32(D),
        z,
        _f32(delta_bias),
        _f32(initial_state),
        bool(delta_softplus),
        CHECKPOINT_EVERY,
    )
    return (out, last_state) if return_last_state else out
