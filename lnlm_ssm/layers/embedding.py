"""Token embedding: the one place where every model family checks its input ids; and the encoders' input embedding.

The table may have more rows than the vocabulary (``padded_vocab_size``, rounded
up for fast matmuls); an id in the padding rows would silently look up an
untrained row, and a negative id would fail with a bare IndexError. So ids are
checked here, for every family:

- on CPU tensors, eagerly: a ValueError naming the offending value and the
  vocabulary size;
- on accelerators, with ``torch._assert_async``, which fails the stream without
  a host sync in the hot path (and inside ``torch.compile``).

``EncoderEmbedding`` is BERT's input: token + learned absolute position (+ token
type) embeddings, then a LayerNorm; its position ids are checked the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from lnlm_ssm.layers.norm import LayerNorm
from lnlm_ssm.utils.checks import check_nonnegative_int, check_positive_int


def check_token_ids(
    input_ids: torch.Tensor, vocab_size: int, *, name: str = "input_ids", size_name: str = "vocab_size"
) -> None:
    """``input_ids`` is an int32/int64 tensor of values in ``[0, vocab_size)``; ``name``, ``size_name``: for messages."""
    if hasattr(input_ids, "to_local"):
        # A DTensor (tensor parallelism's vocab-split embedding, whose ids are replicated): check this rank's copy,
        # since DTensor has no rule for the device-side assert below.
        input_ids = input_ids.to_local()
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
        got = f"dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"{name} must be an int32/int64 tensor; got {got}")
    if input_ids.numel() == 0:
        return
    if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        outside = (input_ids < 0) | (input_ids >= vocab_size)
        if outside.any():
            bad = input_ids[outside][0].item()
            raise ValueError(
                f"{name} must lie in [0, {size_name}={vocab_size}); got the id {bad} "
                f"(ids from {input_ids.min().item()} to {input_ids.max().item()})"
            )
    else:
        inside = ((input_ids >= 0) & (input_ids < vocab_size)).all()
        torch._assert_async(inside, f"{name} must lie in [0, {size_name}={vocab_size})")


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


class EncoderEmbedding(nn.Module):
    """``norm(token(ids) + position(position_ids) + token_type(token_type_ids))``: BERT's input embedding.

    Parameters (HF BERT's names in brackets)::

        token.weight       (vocab_size, dim)            [word_embeddings]
        position.weight    (max_positions, dim)         [position_embeddings]; none when max_positions is 0
        token_type.weight  (type_vocab_size, dim)       [token_type_embeddings]; none when type_vocab_size is 0
        norm.weight, .bias (dim,)                       [LayerNorm]; none when norm_eps is None

    ``position_ids`` default to ``0 .. seqlen - 1``, ``token_type_ids`` to 0.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        max_positions: int = 0,
        type_vocab_size: int = 0,
        norm_eps: float | None = 1e-12,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("dim", dim)
        check_nonnegative_int("max_positions (0: no position embedding)", max_positions)
        check_nonnegative_int("type_vocab_size (0: no token type embedding)", type_vocab_size)
        factory = {"device": device, "dtype": dtype}
        self.token = TokenEmbedding(vocab_size, vocab_size, dim, **factory)
        self.position = nn.Embedding(max_positions, dim, **factory) if max_positions else None
        self.token_type = nn.Embedding(type_vocab_size, dim, **factory) if type_vocab_size else None
        self.norm = None if norm_eps is None else LayerNorm(dim, eps=norm_eps, backend=backend, **factory)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(batch, seqlen) ids -> (batch, seqlen, dim); ``position_ids`` and ``token_type_ids`` shaped as the ids."""
        hidden_states = self.token(input_ids)
        if self.position is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
            self._check_ids("position_ids", position_ids, input_ids, self.position, "max_position_embeddings")
            hidden_states = hidden_states + self.position(position_ids)
        elif position_ids is not None:
            raise ValueError("position_ids were given but this embedding has no position table (max_positions 0)")
        if self.token_type is not None:
            if token_type_ids is None:
                hidden_states = hidden_states + self.token_type.weight[0]
            else:
                self._check_ids("token_type_ids", token_type_ids, input_ids, self.token_type, "type_vocab_size")
                hidden_states = hidden_states + self.token_type(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids were given but this embedding has no token type table (type_vocab_size 0)")
        return hidden_states if self.norm is None else self.norm(hidden_states)

    @staticmethod
    def _check_ids(name: str, ids, input_ids: torch.Tensor, table: nn.Embedding, size_name: str) -> None:
        if isinstance(ids, torch.Tensor) and ids.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(ids.shape)}")
        check_token_ids(ids, table.num_embeddings, name=name, size_name=size_name)
