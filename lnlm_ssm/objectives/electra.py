"""ELECTRA's pre-training: a small masked-LM generator and a replaced-token discriminator, trained together.

A window becomes ``[CLS] window[:-2] [SEP]``; 15% of its text tokens are chosen,
85% of them shown to the generator as [MASK] and 15% as they are
(``data.masking.ELECTRA_MASKING``). The generator is trained by masked LM on
them. At every chosen position a token is sampled from the generator's softmax
(without gradient: the discriminator's loss does not reach the generator through
the samples) and put in the original's place; the discriminator labels every
token replaced (1) or original (0). A sample equal to the original counts as
original, as in the paper. Loss = generator MLM loss + ``disc_weight`` (50, the
paper's) x the discriminator's mean binary cross entropy over tokens.

The model is the generator/discriminator pair: ``model.generator`` (a masked LM)
and ``model.discriminator`` (per-token logits, (batch, seqlen)), sharing token
embeddings.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.data.masking import ELECTRA_MASKING, IGNORE_INDEX, frame, mask_tokens
from lnlm_ssm.objectives.base import ObjectiveOutput
from lnlm_ssm.objectives.mlm import MaskedLMObjective, masked_accuracy

DISC_WEIGHT = 50.0


class Corrupted(NamedTuple):
    """``input_ids``: the discriminator's input; ``replaced``: (batch, seqlen) bool, its labels."""

    input_ids: torch.Tensor
    replaced: torch.Tensor


@torch.no_grad()
def corrupt(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    generator_logits: torch.Tensor,
    vocab_size: int,
    *,
    generator: Optional[torch.Generator] = None,
) -> Corrupted:
    """``input_ids`` (the uncorrupted inputs) with each labelled position (labels != -100) replaced by a
    token sampled from the softmax of ``generator_logits`` there (over the first ``vocab_size`` ids:
    a padded vocabulary's extra rows are never sampled); ``replaced`` is where the sample differs."""
    chosen = labels != IGNORE_INDEX
    probs = generator_logits[chosen][:, :vocab_size].float().softmax(dim=-1)
    sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    corrupted = input_ids.masked_scatter(chosen, sampled)
    return Corrupted(corrupted, corrupted != input_ids)


class ElectraObjective(MaskedLMObjective):
    """Generator MLM + ``disc_weight`` x discriminator loss; see the module docstring.

    Training metrics: ``gen_loss``, ``gen_accuracy`` (masked tokens), ``disc_loss``,
    ``disc_accuracy`` (over all tokens) and ``replaced_fraction`` (of all tokens: the
    discriminator's positive rate).
    """

    name = "electra"
    architectures = ("ElectraPretrainer",)

    def __init__(self, tokenizer=None, *, disc_weight: float = DISC_WEIGHT) -> None:
        if not (isinstance(disc_weight, (int, float)) and disc_weight > 0):
            raise ValueError(f"disc_weight must be a positive number, got {disc_weight!r}")
        self.disc_weight = float(disc_weight)
        super().__init__(tokenizer)

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> ObjectiveOutput:
        tokens = self.tokens
        generator = self.mask_generator(model, batch.device)
        inputs = frame(batch, tokens)
        masked = mask_tokens(inputs, tokens, ELECTRA_MASKING, generator=generator)
        gen_out = model.generator(masked.input_ids, labels=masked.labels)
        corrupted = corrupt(inputs, masked.labels, gen_out.logits, tokens.vocab_size, generator=generator)
        disc_logits = model.discriminator(corrupted.input_ids).logits.float()
        target = corrupted.replaced.float()
        disc_loss = F.binary_cross_entropy_with_logits(disc_logits, target)
        metrics = {
            "gen_loss": gen_out.loss.detach(),
            "gen_accuracy": masked_accuracy(gen_out.logits.detach(), masked.labels),
            "disc_loss": disc_loss.detach(),
            "disc_accuracy": ((disc_logits.detach() > 0) == corrupted.replaced).float().mean(),
            "replaced_fraction": target.mean(),
        }
        return ObjectiveOutput(gen_out.loss + self.disc_weight * disc_loss, metrics)
