"""Public decode step: ``selective_state_update``, as in mamba_ssm."""

from __future__ import annotations

from lnlm_ssm.ops._backends import register, resolve
from lnlm_ssm.ops.state_update.reference import selective_state_update_pooled_ref
from lnlm_ssm.ops.state_update.shapes import canonicalize

_KERNELS = {
    "reference": selective_state_update_pooled_ref,
    "cpu": "lnlm_ssm.ops.state_update.cpu:selective_state_update_cpu",
    "triton": "lnlm_ssm.ops.state_update.triton:selective_state_update_triton",
    "cuda": "lnlm_ssm.ops.state_update.cuda:selective_state_update_cuda",
}
register("selective_state_update", _KERNELS)


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None, *, backend="auto"
):
    """One decoding step: updates ``state`` in place and returns y.

    Shapes are listed in ``lnlm_ssm/ops/state_update/shapes.py`` (Mamba-1 and
    Mamba-2 layouts). y has x's shape and dtype.

    ``state_batch_indices`` (batch,), int32 or int64, makes ``state`` a pool:
    batch row b reads and updates ``state[state_batch_indices[b]]`` in place. A
    negative index marks a padding row: its y is 0 and no slot is read or
    written. The other indices must be distinct slots in ``[0, pool)``; on a
    GPU (or under torch.compile) that is checked on the device, without
    waiting for it, and a bad index fails at the next synchronisation.
    """
    s = canonicalize(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    kernel = resolve("selective_state_update", backend, s.x.device, dtype=s.x.dtype)
    y = kernel(*s, dt_softplus=dt_softplus, state_batch_indices=state_batch_indices)
    return y.squeeze(-1) if state.ndim == 3 else y
