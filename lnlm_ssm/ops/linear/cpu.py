"""``decode_linear`` and ``weight_only_linear`` on the CPU: the C++ kernels in ``csrc/cpu/linear.cpp`` (launchers only)."""

from __future__ import annotations

from lnlm_ssm.ops import _library

_ops = _library.load()


def decode_linear_cpu(x, weight, bias):
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _ops.decode_linear(x, weight, None if bias is None else bias.contiguous())


def weight_only_linear_cpu(x, weight, scale, bias):
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _ops.weight_only_linear(
        x, weight, None if scale is None else scale.contiguous(), None if bias is None else bias.contiguous()
    )
