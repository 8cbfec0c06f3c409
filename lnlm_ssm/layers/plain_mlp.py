"""The ungated MLP, ``fc2(activation(fc1(x)))`` (T5 v1.0's feed-forward), and the activations by their HF names."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.utils.checks import check_positive_int

# The activations by the names HF configs give them. "gelu" is the exact (erf) GELU,
# "gelu_new" its tanh approximation (T5 v1.1's "gated-gelu").
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation ``ACTIVATIONS`` names ``name``; a ValueError listing the known names otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    """``fc2(activation(fc1(x)))``: ``fc1`` in_features -> hidden_features, ``fc2`` hidden_features -> out_features.

    ``activation``: a name in ``ACTIVATIONS``. The hidden size is used as given (no rounding).
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
