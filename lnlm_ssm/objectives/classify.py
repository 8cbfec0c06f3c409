"""Sequence classification: cross entropy of a ``SequenceClassifier``'s label (HF's loss for its problem type)."""

from __future__ import annotations

import torch
from torch import nn

from lnlm_ssm.objectives.base import ObjectiveOutput
from lnlm_ssm.objectives.finetune import FinetuneObjective, label_head


class ClassifyObjective(FinetuneObjective):
    """Rows ``{"text", "label"}``; logs ``accuracy`` (evaluation: ``eval_accuracy``)."""

    name = "classify"
    architectures = ("SequenceClassifier",)
    data_format = "classify"

    def head_arguments(self, label2id):
        # Fixed up front (not inferred on the first forward), so a resumed run's config equals the checkpoint's.
        return {**label_head(label2id), "problem_type": "single_label_classification"}

    def __call__(self, model: nn.Module, batch) -> ObjectiveOutput:
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        accuracy = (out.logits.argmax(dim=-1) == batch["labels"]).to(torch.float32).mean()
        return ObjectiveOutput(loss=out.loss, metrics={"accuracy": accuracy.detach()})
