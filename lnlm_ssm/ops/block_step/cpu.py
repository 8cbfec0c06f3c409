"""The block steps on the CPU: the C++ kernels in ``csrc/cpu/block_step.cpp`` (launchers only).

The OpOverloads themselves: a decode loop calls them once per block per token, so
the launch is the op call and nothing more.
"""

from __future__ import annotations

from lnlm_ssm.ops import _library

_ops = _library.load()

mamba_block_step_cpu = _ops.mamba_block_step.default
mamba2_block_step_cpu = _ops.mamba2_block_step.default
mlp_block_step_cpu = _ops.mlp_block_step.default
