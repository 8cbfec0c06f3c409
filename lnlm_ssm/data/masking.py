"""Masking collators for encoder pre-training: BERT/RoBERTa's masked LM and ELECTRA's generator input.

``frame(windows, tokens)`` lays a corpus window out as an encoder input,
``[CLS] window[:-2] [SEP]`` (the same length), the layout ``fill-mask`` gives a
text. ``mask_tokens(input_ids, tokens, scheme)`` then chooses ``scheme.rate`` of
the text tokens and replaces them, returning the ids the model reads and the
labels (the original id where chosen, -100 elsewhere: Hugging Face's
convention, unshifted). Specials ([PAD], [CLS], [SEP], eos, ...) are never
chosen and never a random replacement. The choice is drawn afresh at every
call, from ``generator`` (RoBERTa's dynamic masking); there is no next-sentence
task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from lnlm_ssm.data.tokenizers import SpecialTokens

__all__ = ["ELECTRA_MASKING", "MLM_MASKING", "MaskedTokens", "MaskingScheme", "frame", "mask_tokens"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MaskingScheme:
    """``rate``: the fraction of text tokens chosen; of those, ``mask_fraction`` become [MASK],
    ``random_fraction`` a random text token, and the rest stay as they are."""

    rate: float
    mask_fraction: float
    random_fraction: float

    def __post_init__(self) -> None:
        for name in ("rate", "mask_fraction", "random_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.rate == 0:
            raise ValueError("rate must be > 0: a batch with nothing chosen has no loss")
        if self.mask_fraction + self.random_fraction > 1:
            raise ValueError(
                f"mask_fraction + random_fraction must be <= 1, got {self.mask_fraction} + {self.random_fraction}"
            )


# BERT and RoBERTa: 15%, of which 80% [MASK], 10% a random token, 10% kept.
MLM_MASKING = MaskingScheme(rate=0.15, mask_fraction=0.8, random_fraction=0.1)
# ELECTRA: 15%, of which 85% [MASK] and 15% kept (the generator's samples are the random tokens).
ELECTRA_MASKING = MaskingScheme(rate=0.15, mask_fraction=0.85, random_fraction=0.0)


class MaskedTokens(NamedTuple):
    """``input_ids``: what the model reads; ``labels``: the original id at chosen positions, -100 elsewhere."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def frame(windows: torch.Tensor, tokens: SpecialTokens) -> torch.Tensor:
    """(batch, seqlen) corpus windows as encoder inputs of the same shape: ``[CLS] window[:-2] [SEP]``."""
    if windows.dim() != 2 or windows.shape[1] < 3:
        raise ValueError(f"windows must be (batch, seqlen) with seqlen >= 3, got shape {tuple(windows.shape)}")
    if tokens.cls is None or tokens.sep is None:
        raise ValueError(f"tokens.cls and tokens.sep must be ids, got {tokens.cls} and {tokens.sep}")
    cls = windows.new_full((windows.shape[0], 1), tokens.cls)
    sep = windows.new_full((windows.shape[0], 1), tokens.sep)
    return torch.cat([cls, windows[:, :-2], sep], dim=1)


def mask_tokens(
    input_ids: torch.Tensor,
    tokens: SpecialTokens,
    scheme: MaskingScheme = MLM_MASKING,
    *,
    generator: Optional[torch.Generator] = None,
) -> MaskedTokens:
    """Choose and replace tokens of ``input_ids`` (batch, seqlen) by ``scheme``; see the module docstring.

    Each text token is chosen independently with probability ``scheme.rate``; a row in which none
    was chosen gets one chosen at random (a row with no text token gets none), so that every
    batch has a loss. ``generator`` (on ``input_ids``' device; None: torch's default one) gives
    every random draw.
    """
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"input_ids must be a (batch, seqlen) int64 tensor, got shape {tuple(input_ids.shape)} {input_ids.dtype}"
        )
    if tokens.mask is None:
        raise ValueError("tokens.mask must be the [MASK] id, got None (SpecialTokens.of(..., roles=['mask']))")
    device = input_ids.device
    special = torch.tensor(tokens.special, dtype=torch.long, device=device)
    text = ~torch.isin(input_ids, special)

    def uniform() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device)

    chosen = text & (uniform() < scheme.rate)
    # The argmax of uniform scores over a row's text tokens is one of them, at random.
    fallback = torch.where(text, uniform(), -1.0).argmax(dim=1, keepdim=True)
    needs_one = text.any(dim=1, keepdim=True) & ~chosen.any(dim=1, keepdim=True)
    chosen = chosen | (needs_one & (torch.arange(input_ids.shape[1], device=device) == fallback))

    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    fate = uniform()
    to_mask = chosen & (fate < scheme.mask_fraction)
    to_random = chosen & ~to_mask & (fate < scheme.mask_fraction + scheme.random_fraction)
    text_ids = torch.arange(tokens.vocab_size, device=device)
    text_ids = text_ids[~torch.isin(text_ids, special)]
    random_ids = text_ids[torch.randint(len(text_ids), input_ids.shape, generator=generator, device=device)]
    masked = torch.where(to_mask, tokens.mask, torch.where(to_random, random_ids, input_ids))
    return MaskedTokens(masked, labels)
