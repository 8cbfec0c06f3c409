"""Decode step on the GPU: the CUDA kernel in ``csrc/cuda/state_update/``.

The launcher only: it takes the canonical form of ``shapes.py`` (state (b, h, p, n);
x, dt, z (b, h, p); A (h, p, n); B, C (b, g, n); D, dt_bias (h, p); any strides,
stride 0 included), updates ``state`` in place and returns y ``(batch, nheads,
headdim)`` in x's dtype. x, dt, z, B and C share one dtype (float32, float16 or
bfloat16); state is float32 or that dtype; dstate is at most 256. With
``state_batch_indices`` (int32 or int64) the state is a pool of slots (see
``shapes.py``). The kernel reads the indices on the device and treats one
outside ``[0, pool)`` as padding, so that none can address memory outside the
state; the public function refuses such values (without a sync) before the launch.

The op's schema and its fake implementation (for ``torch.compile``) come from the
CPU side: ``_library.load()`` imports ``lnlm_ssm._C`` and registers the fake once,
for every device. ``lnlm_ssm._cuda`` only adds the CUDA kernel to that schema, so
it is imported after.
"""

from __future__ import annotations

import importlib

import torch

from lnlm_ssm.ops import _library

_ops = _library.load()  # lnlm_ssm._C first: it defines the schema
importlib.import_module("lnlm_ssm._cuda")  # registers the CUDA kernel


def _float32(t):
    return None if t is None else t.to(torch.float32)


def selective_state_update_cuda(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None
):
    return _ops.selective_state_update(
        state, x, dt, _float32(A), B, C, _float32(D), z, _float32(dt_bias), bool(dt_softplus), state_batch_indices
    )
