"""T5's relative position bias: one learned scalar per head for each bucket of key - query distance.

A distance ``d = key - query`` falls into a bucket (Raffel et al. 2020, T5, section 2.1):

1. bidirectional (an encoder): half of the ``num_buckets`` are for keys after the
   query (``d > 0``), half for the others, and ``n = |d|``; one-sided (a causal
   decoder): all buckets are for keys at or before the query, ``n = max(-d, 0)``;
2. the first half of a side's ``b`` buckets hold the exact distances ``n < b / 2``;
3. the rest cover ``b / 2 <= n < max_distance`` logarithmically, and every
   farther distance shares the last bucket:
   ``b / 2 + floor(log(n / (b / 2)) / log(max_distance / (b / 2)) * (b - b / 2))``.

The bias is the same for every layer of a stack: the stack owns one
``RelativePositionBias`` and gives its output to each attention layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lnlm_ssm.utils.checks import check_positive_int


def relative_position_bucket(
    distance: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """The bucket (int64, like ``distance``) of each key - query ``distance`` (an integer tensor)."""
    buckets = torch.zeros_like(distance, dtype=torch.long)
    if bidirectional:
        num_buckets //= 2
        buckets += (distance > 0).long() * num_buckets
        n = distance.abs()
    else:
        n = (-distance).clamp_min(0)
    max_exact = num_buckets // 2
    # float32 as the original, so that distances on a bucket boundary round the same way.
    ratio = n.float().clamp_min(1) / max_exact
    log_bucket = max_exact + (torch.log(ratio) / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    log_bucket = log_bucket.clamp_max(num_buckets - 1)
    return buckets + torch.where(n < max_exact, n.long(), log_bucket)


class RelativePositionBias(nn.Module):
    """``weight`` (num_buckets, num_heads): the bias of each bucket and head (``nn.Embedding``'s init, N(0, 1)).

    ``forward(query_len, key_len, past=0)`` -> (1, num_heads, query_len, key_len)
    float32 bias for the queries at positions ``past .. past + query_len - 1`` and
    the keys at ``0 .. key_len - 1``.
    """

    def __init__(
        self,
        num_heads: int,
        *,
        bidirectional: bool,
        num_buckets: int = 32,
        max_distance: int = 128,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int("num_heads", num_heads)
        check_positive_int("num_buckets", num_buckets)
        check_positive_int("max_distance", max_distance)
        # Each side needs at least two buckets: one exact (distance 0) and one logarithmic.
        if num_buckets < (4 if bidirectional else 2):
            raise ValueError(
                f"num_buckets must be >= {4 if bidirectional else 2} for a "
                f"{'bidirectional' if bidirectional else 'one-sided'} bias, got {num_buckets}"
            )
        if max_distance <= num_buckets // (4 if bidirectional else 2):
            raise ValueError(
                f"max_distance ({max_distance}) must exceed the exact distances (the first "
                f"{num_buckets // (4 if bidirectional else 2)}): the logarithmic buckets cover the distances between"
            )
        self.num_heads = num_heads
        self.bidirectional = bidirectional
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.weight = nn.Parameter(torch.empty(num_buckets, num_heads, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, bidirectional={self.bidirectional}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}"
        )

    def forward(self, query_len: int, key_len: int, past: int = 0) -> torch.Tensor:
        device = self.weight.device
        query = torch.arange(past, past + query_len, device=device)[:, None]
        key = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_bucket(
            key - query, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        bias = self.weight.float()[buckets]  # (query_len, key_len, num_heads)
        return bias.permute(2, 0, 1)[None]
