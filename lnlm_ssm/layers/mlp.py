"""GatedMLP as mamba_ssm's (SwiGLU by default): fc2(y * activation(gate)), with [y, gate] = fc1(x)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.utils.checks import check_positive_int


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
