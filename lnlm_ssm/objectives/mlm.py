"""Masked language modelling (BERT, RoBERTa, protein LMs such as ESM): predict the masked tokens.

A corpus window becomes ``[CLS] window[:-2] [SEP]`` (``data.masking.frame``, the
layout ``fill-mask`` gives a text); 15% of its text tokens are chosen afresh at
every batch, 80% of them replaced by [MASK], 10% by a random token, 10% kept
(RoBERTa's dynamic masking, no next-sentence task). The loss is the model's own
cross entropy on the chosen tokens. Evaluation reports it (``eval_loss``, nats
per masked token) and the masked-token accuracy (``eval_accuracy``); bits per
byte would mean nothing here.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from lnlm_ssm.data.masking import IGNORE_INDEX, MLM_MASKING, frame, mask_tokens
from lnlm_ssm.data.tokenizers import SpecialTokens
from lnlm_ssm.objectives.base import Objective, ObjectiveOutput

# Held-out batches are masked by a generator seeded with this at every call: every evaluation of a
# run (and of every run on the same data) scores the same masks, and it draws nothing from the
# training generator, so the training masks do not depend on how often a run evaluates.
EVAL_MASKING_SEED = 0


def masked_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fraction of labelled positions (labels != -100) whose arg-max logit is the label."""
    chosen = labels != IGNORE_INDEX
    return (logits[chosen].argmax(dim=-1) == labels[chosen]).float().mean()


class MaskedLMObjective(Objective):
    """Masked LM on ``[CLS] window[:-2] [SEP]``; see the module docstring.

    ``tokenizer``: the one the corpus was made with (or later, ``use_tokenizer``); it must have
    [MASK], [CLS] and [SEP]. See ``mask_generator`` for where the random draws come from.
    """

    name = "mlm"
    architectures = ("MaskedLM",)
    # The specials this objective's inputs are made of.
    roles: tuple[str, ...] = ("mask", "cls", "sep")

    def __init__(self, tokenizer=None) -> None:
        self._tokens: Optional[SpecialTokens] = None
        if tokenizer is not None:
            self.use_tokenizer(tokenizer)

    def use_tokenizer(self, tokenizer) -> None:
        self._tokens = SpecialTokens.of(tokenizer, self.roles, needed_by=f"the {self.name} objective")

    @property
    def tokens(self) -> SpecialTokens:
        """The tokenizer's special ids; an error before a tokenizer was given."""
        if self._tokens is None:
            raise RuntimeError(
                f"the {self.name} objective has no tokenizer: pass it to the constructor or to use_tokenizer first"
            )
        return self._tokens

    @staticmethod
    def mask_generator(model: nn.Module, device: torch.device) -> torch.Generator:
        """A generator on ``device`` for the random draws of one batch.

        In training, seeded by a draw from torch's default CPU generator (which the loop seeds and
        saves in its checkpoints, so a resumed run masks as an uninterrupted one would) plus the
        process's rank (every rank starts from the same seed: without it, all would mask the same
        positions). In evaluation, seeded with ``EVAL_MASKING_SEED``.
        """
        if not model.training:
            return torch.Generator(device=device).manual_seed(EVAL_MASKING_SEED)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = int(torch.randint(0, 2**62, ()))
        return torch.Generator(device=device).manual_seed(seed + rank)

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> ObjectiveOutput:
        tokens = self.tokens
        generator = self.mask_generator(model, batch.device)
        masked = mask_tokens(frame(batch, tokens), tokens, MLM_MASKING, generator=generator)
        out = model(masked.input_ids, labels=masked.labels)
        return ObjectiveOutput(out.loss, {"accuracy": masked_accuracy(out.logits.detach(), masked.labels)})

    def eval_metrics(
        self, eval_loss: float, bytes_per_token: float, metrics: Optional[Mapping[str, float]] = None
    ) -> dict[str, float]:
        return {"eval_loss": eval_loss, **{f"eval_{k}": v for k, v in (metrics or {}).items()}}
