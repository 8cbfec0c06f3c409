"""The MLPs of a block.

- ``GatedMLP`` as mamba_ssm's (SwiGLU by default): fc2(y * activation(gate)), with [y, gate] = fc1(x);
- ``MLP``, BERT's and GPT-2's: fc2(activation(fc1(x))), with biases; the activation by its HF name (``ACTIVATIONS``).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.utils.checks import check_positive_int


# The activations by the names HF configs give them (hidden_act, activation_function).
# "gelu" is the exact (erf) GELU; "gelu_new" and "gelu_pytorch_tanh" are both its tanh approximation.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation ``ACTIVATIONS`` names ``name``; a ValueError listing the known names otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


# mamba_ssm's default: hidden sizes are rounded up to this, so its checkpoints' fc1/fc2 shapes come out the same.
MLP_MULTIPLE_OF = 128


def rounded_hidden_size(hidden_features: int, multiple_of: int = MLP_MULTIPLE_OF) -> int:
    """``hidden_features`` rounded up to a multiple of ``multiple_of``: the hidden size GatedMLP builds."""
    return -(-hidden_features // multiple_of) * multiple_of


class GatedMLP(nn.Module):
    """``fc1``: in_features -> 2 * hidden (first half the value y, second half the gate); ``fc2``: hidden -> out.

    hidden_features defaults to ``int(8 * in_features / 3)``; like mamba_ssm, the
    hidden size is then rounded up to a multiple of ``multiple_of`` (given or
    not), so its checkpoints' fc1/fc2 shapes come out the same.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
        bias: bool = False,
        multiple_of: int = MLP_MULTIPLE_OF,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("hidden_features", hidden_features),
            ("out_features", out_features),
            ("multiple_of", multiple_of),
        ):
            if value is not None:
                check_positive_int(name, value)
        if not callable(activation):
            raise TypeError(f"activation must be callable, got {type(activation).__name__}")
        out_features = in_features if out_features is None else out_features
        hidden_features = int(8 * in_features / 3) if hidden_features is None else hidden_features
        hidden_features = rounded_hidden_size(hidden_features, multiple_of)

        factory = {"device": device, "dtype": dtype}
        self.activation = activation
        self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * self.activation(gate))


class MLP(nn.Module):
    """``fc2(activation(fc1(x)))``: ``fc1`` in_features -> hidden_features, ``fc2`` hidden_features -> out_features.

    BERT's feed-forward (its ``intermediate.dense`` and ``output.dense``) and GPT-2's
    (``c_fc``, ``c_proj``). ``activation``: a name in ``ACTIVATIONS`` ("gelu", the exact
    GELU, by default). The hidden size is used as given (no rounding).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: Optional[int] = None,
        activation: str = "gelu",
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("hidden_features", hidden_features)
        out_features = in_features if out_features is None else check_positive_int("out_features", out_features)
        self.activation_name = activation
        self.activation = activation_fn(activation)
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **factory)

    def extra_repr(self) -> str:
        return f"activation={self.activation_name!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))
