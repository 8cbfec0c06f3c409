"""ALBERT's sentence-order pairs: two consecutive segments of a window, swapped half the time.

``sentence_order_pairs(windows, tokens)`` cuts each corpus window into a segment
A and the segment B that follows it, and lays them out as
``[CLS] A [SEP] B [SEP]`` (label 0, the original order) or ``[CLS] B [SEP] A [SEP]``
(label 1, swapped), with token types 0 up to the first [SEP] and 1 after it,
right-padded with [PAD] to the window's length. As in ALBERT, the pair fills the
whole length except, with probability ``short_fraction``, a random shorter
length; the cut between A and B is uniform. Segments are cut from the window by
position, not at sentence ends (a window is a random slice of the token stream).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from lnlm_ssm.data.tokenizers import SpecialTokens

__all__ = ["SentencePairs", "sentence_order_pairs"]

# ALBERT's short_seq_prob: how often a pair is shorter than the window, so padding is seen in training.
SHORT_FRACTION = 0.1


class SentencePairs(NamedTuple):
    """Encoder inputs (batch, seqlen) and ``sentence_order_label`` (batch,): 0 original order, 1 swapped."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor
    sentence_order_label: torch.Tensor


def sentence_order_pairs(
    windows: torch.Tensor,
    tokens: SpecialTokens,
    *,
    short_fraction: float = SHORT_FRACTION,
    generator: Optional[torch.Generator] = None,
) -> SentencePairs:
    """Sentence-order pairs of the same shape as ``windows`` (batch, seqlen >= 5); see the module docstring.

    ``tokens`` needs ``cls``, ``sep`` and ``pad``. ``generator`` (on ``windows``' device; None:
    torch's default one) gives every random draw.
    """
    if windows.dim() != 2 or windows.shape[1] < 5:
        raise ValueError(f"windows must be (batch, seqlen) with seqlen >= 5, got shape {tuple(windows.shape)}")
    missing = [role for role in ("cls", "sep", "pad") if getattr(tokens, role) is None]
    if missing:
        raise ValueError(f"tokens must have cls, sep and pad ids; {', '.join(missing)} is None")
    if not (isinstance(short_fraction, (int, float)) and 0 <= short_fraction <= 1):
        raise ValueError(f"short_fraction must be a number in [0, 1], got {short_fraction!r}")
    batch, seqlen = windows.shape
    device = windows.device

    def uniform() -> torch.Tensor:
        return torch.rand(batch, generator=generator, device=device)

    # Lengths: total = len(A) + len(B) in [2, seqlen - 3], len(A) in [1, total - 1].
    room = seqlen - 3
    short = uniform() < short_fraction
    total = torch.where(short, 2 + (uniform() * (room - 1)).long(), room)
    len_a = 1 + (uniform() * (total - 1)).long()
    len_b = total - len_a
    swapped = uniform() < 0.5

    first_start = torch.where(swapped, len_a, 0)[:, None]
    first_len = torch.where(swapped, len_b, len_a)[:, None]
    second_start = torch.where(swapped, 0, len_a)[:, None]
    end = (total + 2)[:, None]  # the position of the last [SEP]
    j = torch.arange(seqlen, device=device)[None, :]
    in_first = (j >= 1) & (j <= first_len)
    in_second = (j >= first_len + 2) & (j < end)
    source = torch.where(in_first, first_start + j - 1, second_start + j - first_len - 2)
    text = windows.gather(1, source.clamp(0, seqlen - 1))

    input_ids = torch.full_like(windows, tokens.pad)
    input_ids = torch.where(in_first | in_second, text, input_ids)
    input_ids = torch.where((j == first_len + 1) | (j == end), tokens.sep, input_ids)
    input_ids[:, 0] = tokens.cls
    token_type_ids = ((j > first_len + 1) & (j <= end)).long()
    attention_mask = (j <= end).long()
    return SentencePairs(input_ids, token_type_ids, attention_mask, swapped.long())
