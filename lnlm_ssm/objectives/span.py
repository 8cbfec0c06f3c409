"""T5's span corruption (Raffel et al. 2020): the encoder reads a corpus window with spans replaced by
sentinels, and the decoder spells the spans out.

Each window of a batch is corrupted afresh at every step by ``data.span_corruption``
(noise density 0.15, mean span length 3): the encoder's input is the kept tokens,
each span replaced by its sentinel, then EOS; the target is every span's sentinel
followed by the span, then EOS. The sentinels are the model's top ``NUM_SENTINELS``
ids, ``<extra_id_0>`` the highest, above the tokenizer's vocabulary as ByT5 has them
(``extra_ids``: the loop sizes the model's vocabulary for them). The loss is the
model's own cross entropy over the target tokens; evaluation reports it
(``eval_loss``, nats per target token) and the target-token accuracy (``eval_accuracy``).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from lnlm_ssm.data.span_corruption import SpanCorruptionCollator
from lnlm_ssm.data.tokenizers import SpecialTokens
from lnlm_ssm.objectives.base import Objective, ObjectiveOutput
from lnlm_ssm.objectives.mlm import MaskedLMObjective, masked_accuracy

NUM_SENTINELS = 100
NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


class SpanCorruptionObjective(Objective):
    """Span corruption on corpus windows; see the module docstring.

    ``tokenizer``: the corpus's (or later, ``use_tokenizer``); it must have an eos and a
    [PAD] token (the padding of the corrupted inputs). Random draws come from a
    generator made as the masked LM objective's (``MaskedLMObjective.mask_generator``).
    """

    name = "span"
    architectures = ("Seq2SeqLM",)
    extra_ids = NUM_SENTINELS

    def __init__(self, tokenizer=None) -> None:
        self._tokens: Optional[SpecialTokens] = None
        self._eos: Optional[int] = None
        if tokenizer is not None:
            self.use_tokenizer(tokenizer)

    def use_tokenizer(self, tokenizer) -> None:
        needed_by = f"the {self.name} objective"
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError(f"{needed_by} needs a tokenizer with an eos token; {tokenizer!r} has none")
        self._tokens = SpecialTokens.of(tokenizer, ("pad",), needed_by=needed_by)
        self._eos = int(tokenizer.eos_token_id)

    def collator(self, model: nn.Module, generator: torch.Generator) -> SpanCorruptionCollator:
        """The collator of ``model``'s sentinels (its top ids), drawing from ``generator``."""
        if self._tokens is None:
            raise RuntimeError(
                f"the {self.name} objective has no tokenizer: pass it to the constructor or to use_tokenizer first"
            )
        vocab_size = getattr(model, "module", model).config.vocab_size  # DDP wraps the model
        if vocab_size < self._tokens.vocab_size + NUM_SENTINELS:
            raise ValueError(
                f"the {self.name} objective needs {NUM_SENTINELS} sentinel ids above the tokenizer's "
                f"{self._tokens.vocab_size}: model vocab_size must be >= {self._tokens.vocab_size + NUM_SENTINELS}; "
                f"got {vocab_size}"
            )
        return SpanCorruptionCollator(
            first_sentinel_id=vocab_size - 1,
            eos_token_id=self._eos,
            pad_token_id=self._tokens.pad,
            num_sentinels=NUM_SENTINELS,
            noise_density=NOISE_DENSITY,
            mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH,
            generator=generator,
        )

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> ObjectiveOutput:
        # The collator draws on the CPU (torch.randperm), whatever the batch's device.
        generator = MaskedLMObjective.mask_generator(model, torch.device("cpu"))
        corrupted = self.collator(model, generator)(batch.cpu())
        corrupted = {k: v.to(batch.device) for k, v in corrupted.items()}
        out = model(**corrupted)
        return ObjectiveOutput(out.loss, {"accuracy": masked_accuracy(out.logits.detach(), corrupted["labels"])})

    def eval_metrics(
        self, eval_loss: float, bytes_per_token: float, metrics: Optional[Mapping[str, float]] = None
    ) -> dict[str, float]:
        return {"eval_loss": eval_loss, **{f"eval_{k}": v for k, v in (metrics or {}).items()}}
