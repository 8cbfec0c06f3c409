"""ALBERT's pre-training: masked LM plus sentence-order prediction (SOP).

Each window becomes a pair ``[CLS] A [SEP] B [SEP]`` of two consecutive segments,
swapped half the time (``data.sentence_order``), and is then masked as for the
masked LM (``objectives.mlm``). The loss is the model's masked-LM loss plus the
cross entropy of its sentence-order logits (``output.sop_logits``, (batch, 2);
label 0: original order, 1: swapped, Hugging Face's convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.data.masking import MLM_MASKING, mask_tokens
from lnlm_ssm.data.sentence_order import sentence_order_pairs
from lnlm_ssm.objectives.base import ObjectiveOutput
from lnlm_ssm.objectives.mlm import MaskedLMObjective, masked_accuracy


class SentenceOrderObjective(MaskedLMObjective):
    """Masked LM + sentence order, on a masked LM with a sentence-order head; see the module docstring.

    A model whose output has no ``sop_logits`` is refused at the first batch. Training metrics:
    ``mlm_loss``, ``accuracy`` (masked tokens), ``sop_loss``, ``sop_accuracy``.
    """

    name = "sop"
    architectures = ("MaskedLM",)
    roles = ("mask", "cls", "sep", "pad")

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> ObjectiveOutput:
        tokens = self.tokens
        generator = self.mask_generator(model, batch.device)
        pairs = sentence_order_pairs(batch, tokens, generator=generator)
        masked = mask_tokens(pairs.input_ids, tokens, MLM_MASKING, generator=generator)
        out = model(
            masked.input_ids,
            attention_mask=pairs.attention_mask,
            token_type_ids=pairs.token_type_ids,
            labels=masked.labels,
        )
        sop_logits = getattr(out, "sop_logits", None)
        if sop_logits is None:
            raise TypeError(
                f"the sop objective needs a model with a sentence-order head (an output with sop_logits); "
                f"a {type(model).__name__} has none: use the mlm objective, or an ALBERT pre-training model"
            )
        sop_loss = F.cross_entropy(sop_logits.float(), pairs.sentence_order_label)
        sop_accuracy = (sop_logits.detach().argmax(dim=-1) == pairs.sentence_order_label).float().mean()
        metrics = {
            "mlm_loss": out.loss.detach(),
            "accuracy": masked_accuracy(out.logits.detach(), masked.labels),
            "sop_loss": sop_loss.detach(),
            "sop_accuracy": sop_accuracy,
        }
        return ObjectiveOutput(out.loss + sop_loss, metrics)
