"""Tensor validation shared by the public ops (the checks of plain arguments are in ``lnlm_ssm.utils.checks``).

Every public op checks its inputs here before any kernel sees them, so that a
user gets a ValueError/TypeError that names the argument and says what was
expected, instead of an index error from deep inside a kernel.

The central tool is :class:`Shapes`: each tensor is bound to a layout such as
``("batch", "dim", "seqlen")``; the first tensor that names a size fixes it and
every later tensor must agree.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_FLOAT_NAMES = "float32, float64, bfloat16 or float16"


def _layout(names: Sequence[str]) -> str:
    return "(" + ", ".join(names) + ")"


class Shapes:
    """Binds tensors to named layouts and checks that named sizes agree.

    ``device`` is taken from the first tensor bound; every later tensor must
    live on it.
    """

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self._source: dict[str, str] = {}
        self.device: Optional[torch.device] = None
        self._device_source = ""

    def __getitem__(self, name: str) -> int:
        return self.sizes[name]

    def bind(self, arg: str, value, layout: Sequence[str], *, floating: bool = True) -> torch.Tensor:
        """Check ``value`` (the argument called ``arg``) against ``layout``.

        Integer entries in ``layout`` are fixed sizes; strings are named sizes.
        ``floating=False`` asks for an integer tensor instead of a float one.
        """
        tensor = check_tensor(arg, value, floating=floating)
        if tensor.ndim != len(layout):
            raise ValueError(
                f"{arg} must have {len(layout)} dimensions {_layout(map(str, layout))}, "
                f"got shape {tuple(tensor.shape)}"
            )
        for axis, (name, size) in enumerate(zip(layout, tensor.shape)):
            if isinstance(name, int):
                if size != name:
                    raise ValueError(
                        f"{arg} must have size {name} in dimension {axis} of "
                        f"{_layout(map(str, layout))}, got shape {tuple(tensor.shape)}"
                    )
                continue
            if name not in self.sizes:
                self.sizes[name] = size
                self._source[name] = arg
            elif self.sizes[name] != size:
                raise ValueError(
                    f"{arg} has shape {tuple(tensor.shape)} {_layout(map(str, layout))}, "
                    f"but {name} = {self.sizes[name]} (from {self._source[name]})"
                )
        self._check_device(arg, tensor)
        return tensor

    def bind_optional(self, arg: str, value, layout: Sequence[str], **kwargs) -> Optional[torch.Tensor]:
        return None if value is None else self.bind(arg, value, layout, **kwargs)

    def _check_device(self, arg: str, tensor: torch.Tensor) -> None:
        if self.device is None:
            self.device, self._device_source = tensor.device, arg
        elif tensor.device != self.device:
            raise ValueError(
                f"{arg} is on {tensor.device}, but {self._device_source} is on {self.device}: "
                "all tensors must be on the same device"
            )


def check_tensor(arg: str, value, *, floating: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{arg} must have dtype {_FLOAT_NAMES}, got {value.dtype}")
    if not floating and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"{arg} must have an integer dtype, got {value.dtype}")
    return value


def check_seq_idx(seq_idx: torch.Tensor) -> None:
    """seq_idx marks packed sequences: it must not decrease along seqlen."""
    if seq_idx.shape[-1] > 1 and bool((seq_idx[..., 1:] < seq_idx[..., :-1]).any()):
        raise ValueError("seq_idx must be non-decreasing along seqlen (one run of equal values per packed sequence)")


def check_divisible(arg: str, size: int, by_arg: str, by: int) -> None:
    if by <= 0 or size % by != 0:
        raise ValueError(f"{arg} ({size}) must be divisible by {by_arg} ({by})")
