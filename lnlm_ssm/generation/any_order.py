"""Any-order generation: fill chosen positions of a sequence, one at a time, in a chosen order (σ-GPT decoding).

The model is an any-order LM (``models.AnyOrderLM``): it reads tokens in a
factorisation order, each with its own position and the position it is asked to
predict next. Generation feeds the known tokens first (in position order), each
announcing the next known position, the last one announcing the first position
to fill; then it samples that position, feeds it announcing the next one, and so
on. Infilling is the case where the known tokens are a prefix and a suffix.
"""

from __future__ import annotations

from typing import Optional

import torch

from lnlm_ssm.generation.sampling import sample_next_token

__all__ = ["check_order", "generate_any_order", "infill_canvas"]


def check_order(order, seqlen: int, batch: int, *, name: str = "order", full: bool = False) -> torch.Tensor:
    """``order`` as a (batch, n) int64 tensor of distinct positions in ``[0, seqlen)`` per row.

    ``order`` may be (n,) (the same for every row) or (batch, n); with ``full`` it
    must be a whole permutation (n == seqlen).
    """
    if isinstance(order, (list, tuple)):
        order = torch.tensor(order)
    if not isinstance(order, torch.Tensor) or order.dtype not in (torch.int32, torch.int64) or order.ndim not in (1, 2):
        raise ValueError(f"{name} must be an int tensor of positions, (n,) or (batch, n); got {order!r:.80}")
    if order.ndim == 1:
        order = order.expand(batch, -1)
    if order.shape[0] != batch:
        raise ValueError(f"{name} has {order.shape[0]} rows; the input has batch {batch}")
    n = order.shape[1]
    if full and n != seqlen:
        raise ValueError(f"{name} must be a permutation of 0..{seqlen - 1}: {seqlen} positions; got {n}")
    if order.numel() and (order.min() < 0 or order.max() >= seqlen):
        raise ValueError(f"{name} must hold positions in [0, {seqlen}); got values from {order.min()} to {order.max()}")
    if n > 1 and (order.sort(dim=1).values.diff(dim=1) == 0).any():
        raise ValueError(f"{name} must not repeat a position (it must be part of a permutation of 0..{seqlen - 1})")
    return order.long()


@torch.no_grad()
def generate_any_order(
    model,
    input_ids: torch.Tensor,
    order,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``input_ids`` (batch, seqlen) with the positions ``order`` lists sampled, in that order.

    ``order`` (n,) or (batch, n): distinct positions, fewer than seqlen; the others
    are known, and their tokens in ``input_ids`` are kept (what ``input_ids`` holds
    at the positions to fill is ignored). ``model.ordered_logits(tokens,
    positions, next_positions, cache=...)`` gives the logits; sampling is
    ``generation.sample_next_token``'s (``temperature=0``: greedy).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a tensor of shape (batch, seqlen >= 1); got {input_ids!r:.80}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy); got {temperature!r}")
    batch, seqlen = input_ids.shape
    device = input_ids.device
    fill = check_order(order, seqlen, batch).to(device)
    n = fill.shape[1]
    if n >= seqlen:
        raise ValueError(
            f"order lists {n} positions of a sequence of {seqlen}: at least one position must be known (a model "
            "in any order predicts each token from the ones before it; give a start token)"
        )
    out = input_ids.clone()
    if n == 0:
        return out
    unknown = torch.zeros(batch, seqlen, dtype=torch.bool, device=device).scatter_(1, fill, True)
    # Known positions in position order (stable sort keeps the ascending positions of each part).
    known = torch.argsort(unknown.to(torch.int8), dim=1, stable=True)[:, : seqlen - n]
    full = torch.cat([known, fill], dim=1)
    next_positions = torch.cat([full[:, 1:], full.new_full((batch, 1), -1)], dim=1)
    cache = model.allocate_cache(batch, seqlen, device=device)
    logits = model.ordered_logits(
        out.gather(1, known), known, next_positions[:, : seqlen - n], cache=cache, num_last_tokens=1
    )[:, -1]
    for step in range(n):
        position = fill[:, step : step + 1]
        token = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        out.scatter_(1, position, token[:, None].to(out.dtype))
        if step + 1 < n:
            k = seqlen - n + step
            logits = model.ordered_logits(
                token[:, None], position, next_positions[:, k : k + 1], cache=cache, num_last_tokens=1
            )[:, -1]
    return out


def infill_canvas(prefix: torch.Tensor, suffix: torch.Tensor, length: int, *, fill_id: int = 0):
    """``(input_ids, order)`` for infilling: ``prefix`` (batch, p), ``length`` positions to fill, ``suffix`` (batch, s).

    The canvas holds ``fill_id`` in the middle; ``order`` fills it left to right.
    """
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length must be an integer >= 1 (the positions to fill); got {length!r}")
    for name, part in (("prefix", prefix), ("suffix", suffix)):
        if not isinstance(part, torch.Tensor) or part.ndim != 2:
            raise ValueError(f"{name} must be a tensor of shape (batch, n); got {part!r:.80}")
    if prefix.shape[0] != suffix.shape[0]:
        raise ValueError(f"prefix and suffix must have the same batch; got {prefix.shape[0]} and {suffix.shape[0]}")
    if prefix.shape[1] + suffix.shape[1] == 0:
        raise ValueError("prefix and suffix are both empty: infilling needs at least one known token")
    middle = prefix.new_full((prefix.shape[0], length), fill_id)
    input_ids = torch.cat([prefix, middle, suffix.to(prefix.dtype)], dim=1)
    order = torch.arange(prefix.shape[1], prefix.shape[1] + length, device=prefix.device)
    return input_ids, order
