"""Factorisation orders for permutation language modelling (XLNet; σ-GPT), with partial prediction.

Only the last part of each order is predicted (XLNet's partial prediction): the
targets. They are drawn in one of two ways:

- ``"span"`` (the default, as HF's ``DataCollatorForPermutationLanguageModeling``):
  the sequence is cut into windows; each window of ``span / plm_probability``
  tokens holds one span of ``span`` tokens (``span`` uniform in
  ``1..max_span_length``) at a random offset, and the spans are the targets;
- ``"random"``: a uniformly random ``1/partial_k`` of the positions (at least one).

An order lists the non-targets first, in text order, then the targets,
shuffled: any order of the targets is a factorisation. To XLNet, whose context
sees all of itself, the context's order is immaterial; a causal stack reads it
one token at a time, and in text order its conv and its state see true
neighbours, where a shuffled context would make it recall each target's
neighbours from a hundred (token, position) pairs. ``xlnet_inputs`` expresses the order
for XLNet as ``perm_mask`` and ``target_mapping``: the context sees all of
itself, and a target is seen only by the positions after it in the order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lnlm_ssm.utils.checks import check_choice, check_positive_int

__all__ = ["IGNORE_INDEX", "PermutationBatch", "draw_targets", "factorisation_orders", "xlnet_inputs"]

IGNORE_INDEX = -100
TARGET_MODES = ("span", "random")


@dataclass
class PermutationBatch:
    """XLNet's inputs for one batch of ``input_ids`` (batch, seqlen) (``xlnet_inputs``).

    - ``order`` (batch, seqlen): the factorisation order, non-targets first;
    - ``targets`` (batch, seqlen) bool: the positions predicted;
    - ``perm_mask`` (batch, seqlen, seqlen) bool: True where i may not see j;
    - ``target_mapping`` (batch, num_predict, seqlen) float: one-hot rows at each
      row's targets, in position order; rows past a sequence's own target count are
      zero (num_predict is the largest count in the batch);
    - ``labels`` (batch, num_predict): the target tokens, -100 on the zero rows.
    """

    input_ids: torch.Tensor
    order: torch.Tensor
    targets: torch.Tensor
    perm_mask: torch.Tensor
    target_mapping: torch.Tensor
    labels: torch.Tensor


def draw_targets(
    batch: int,
    seqlen: int,
    *,
    mode: str = "span",
    partial_k: int = 6,
    max_span_length: int = 5,
    plm_probability: float = 1 / 6,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """The predicted positions (batch, seqlen) bool, each row with at least one; see the module docstring."""
    check_positive_int("batch", batch)
    check_positive_int("seqlen", seqlen)
    check_choice("mode", mode, TARGET_MODES)
    targets = torch.zeros(batch, seqlen, dtype=torch.bool)
    if mode == "random":
        check_positive_int("partial_k", partial_k)
        count = max(1, seqlen // partial_k)
        scores = torch.rand(batch, seqlen, generator=generator)
        targets.scatter_(1, scores.topk(count, dim=1).indices, True)
        return targets.to(device)
    check_positive_int("max_span_length", max_span_length)
    if not 0 < plm_probability <= 1:
        raise ValueError(f"plm_probability must be in (0, 1]; got {plm_probability!r}")
    for row in range(batch):
        start = 0
        while start < seqlen:
            span = int(torch.randint(1, max_span_length + 1, (1,), generator=generator))
            window = int(span / plm_probability)
            offset = start + int(torch.randint(0, window - span + 1, (1,), generator=generator))
            targets[row, offset : offset + span] = True
            start += window
        if not targets[row].any():  # the only span fell past the end of a short sequence
            targets[row, int(torch.randint(0, seqlen, (1,), generator=generator))] = True
    return targets.to(device)


def factorisation_orders(targets: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Orders (batch, seqlen) int64: each row's non-targets in text order, then its ``targets`` (batch, seqlen)
    bool, shuffled."""
    if not isinstance(targets, torch.Tensor) or targets.dtype != torch.bool or targets.ndim != 2:
        raise ValueError(f"targets must be a bool tensor (batch, seqlen); got {targets!r:.80}")
    noise = torch.rand(targets.shape, generator=generator).to(targets.device)
    # A stable sort by (is target, noise of targets only): the non-targets first, in text order.
    key = targets.to(noise.dtype) * (2 + noise)
    return torch.argsort(key, dim=1, stable=True)


def xlnet_inputs(input_ids: torch.Tensor, targets: torch.Tensor, order: torch.Tensor) -> PermutationBatch:
    """XLNet's ``perm_mask``, ``target_mapping`` and ``labels`` for ``input_ids`` (batch, seqlen) read in ``order``
    (``factorisation_orders``) with ``targets`` (``draw_targets``) predicted."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(f"input_ids must be a tensor of shape (batch, seqlen); got {input_ids!r:.80}")
    batch, seqlen = input_ids.shape
    for name, t in (("targets", targets), ("order", order)):
        if not isinstance(t, torch.Tensor) or t.shape != input_ids.shape:
            raise ValueError(f"{name} must be a tensor of shape (batch, seqlen) = {tuple(input_ids.shape)}")
    device = input_ids.device
    targets, order = targets.to(device), order.to(device)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(seqlen, device=device).expand(batch, seqlen))
    # i may not see j when j is a target not before i in the order (a target does not see itself).
    perm_mask = (rank[:, :, None] <= rank[:, None, :]) & targets[:, None, :]
    counts = targets.sum(dim=1)
    num_predict = int(counts.max())
    # The k-th target of each row, in position order; rows with fewer targets point at position 0, masked below.
    positions = torch.argsort((~targets).to(torch.int8), dim=1, stable=True)[:, :num_predict]
    valid = torch.arange(num_predict, device=device)[None, :] < counts[:, None]
    target_mapping = torch.zeros(batch, num_predict, seqlen, device=device)
    target_mapping.scatter_(2, positions[:, :, None], valid[:, :, None].float())
    labels = input_ids.gather(1, positions).masked_fill(~valid, IGNORE_INDEX)
    return PermutationBatch(input_ids, order, targets, perm_mask, target_mapping, labels)
