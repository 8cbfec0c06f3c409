"""``decode_linear`` on the CPU: the C++ kernel in ``csrc/cpu/linear.cpp`` (launcher only)."""

from __future__ import annotations

from lnlm_ssm.ops import _library

_ops = _library.load()


def decode_linear_cpu(x, weight, bias):
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _ops.decode_linear(x, weight, None if bias is None else bias.contiguous())
