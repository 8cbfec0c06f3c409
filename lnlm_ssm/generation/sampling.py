"""Sampling: from the logits of one position (batch, vocab) to the next token.

Every filter takes logits and returns new logits; filtered-out tokens get -inf so
that softmax gives them probability zero.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["apply_repetition_penalty", "sample_next_token", "top_k_filter", "top_p_filter"]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make the tokens marked in ``seen`` (batch, vocab) bool less likely (CTRL paper, Keskar et al. 2019).

    A positive logit is divided by ``penalty``, a negative one multiplied, so that
    ``penalty > 1`` always lowers the token's probability.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (0: keep all)."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2019): keep the most likely tokens until their mass reaches ``top_p``.

    A token is kept when the mass of the more likely tokens before it is below
    ``top_p``, so the most likely token is always kept.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One token per row of ``logits`` (batch, vocab) -> (batch,) int64.

    ``temperature == 0`` or ``top_k == 1`` is greedy (argmax). Otherwise the logits are
    divided by ``temperature``, filtered by ``top_k`` then ``top_p``, and sampled.
    """
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
