"""Token embedding: the one place where every model family checks its input ids.

The table may have more rows than the vocabulary (``padded_vocab_size``, rounded
up for fast matmuls); an id in the padding rows would silently look up an
untrained row, and a negative id would fail with a bare IndexError. So ids are
checked here, for every family:

- on CPU tensors, eagerly: a ValueError naming the offending value and the
  vocabulary size;
- on accelerators, with ``torch._assert_async``, which fails the stream without
  a host sync in the hot path (and inside ``torch.compile``).
"""

from __future__ import annotations

import torch
from torch import nn

from lnlm_ssm.utils.checks import check_positive_int


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """``input_ids`` is an int32/int64 tensor of values in ``[0, vocab_size)``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        got = f"dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be an int32/int64 tensor; got {got}")
    if input_ids.numel() == 0:
        return
    if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        outside = (input_ids < 0) | (input_ids >= vocab_size)
        if outside.any():
            bad = input_ids[outside][0].item()
            raise ValueError(
                f"input_ids must lie in [0, vocab_size={vocab_size}); got the id {bad} "
                f"(ids from {input_ids.min().item()} to {input_ids.max().item()})"
            )
    else:
        inside = ((input_ids >= 0) & (input_ids < vocab_size)).all()
        torch._assert_async(inside, f"input_ids must lie in [0, vocab_size={vocab_size})")


class TokenEmbedding(nn.Embedding):
    """``nn.Embedding`` of ``padded_vocab_size`` rows (parameter ``weight``) that accepts only ids below ``vocab_size``."""

    def __init__(self, vocab_size: int, padded_vocab_size: int, embedding_dim: int, device=None, dtype=None) -> None:
        check_positive_int("vocab_size", vocab_size)
        if padded_vocab_size < vocab_size:
            raise ValueError(f"padded_vocab_size ({padded_vocab_size}) must be >= vocab_size ({vocab_size})")
        super().__init__(padded_vocab_size, embedding_dim, device=device, dtype=dtype)
        self.vocab_size = vocab_size

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, " + super().extra_repr()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(input_ids, self.vocab_size)
        return super().forward(input_ids)
