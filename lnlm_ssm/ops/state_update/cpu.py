"""Decode step on the CPU: the C++ kernel in ``csrc/cpu/state_update.cpp``.

The launcher only: it takes the canonical form of ``shapes.py`` (as produced by
:func:`~lnlm_ssm.ops.state_update.shapes.canonicalize`, any strides, stride 0
included), updates ``state`` in place and returns y ``(batch, nheads, headdim)``
in x's dtype; with ``state_batch_indices`` the state is a pool of slots (see
``shapes.py``). The public ``selective_state_update(..., backend="cpu")``
validates and canonicalises before calling it.
"""

from __future__ import annotations

from lnlm_ssm.ops import _library

_ops = _library.load()


def selective_state_update_cpu(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None
):
    return _ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), state_batch_indices)
