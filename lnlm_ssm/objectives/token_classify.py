"""Token classification: mean cross entropy of a ``TokenClassifier``'s label at every labelled token."""

from __future__ import annotations

import torch
from torch import nn

from lnlm_ssm.data.finetune import IGNORE_INDEX
from lnlm_ssm.objectives.base import ObjectiveOutput
from lnlm_ssm.objectives.finetune import FinetuneObjective, label_head


class TokenClassifyObjective(FinetuneObjective):
    """Rows ``{"tokens", "labels"}`` (see ``data.finetune``); logs the token ``accuracy``."""

    name = "token-classify"
    architectures = ("TokenClassifier",)
    data_format = "token"

    def head_arguments(self, label2id):
        return label_head(label2id)

    def __call__(self, model: nn.Module, batch) -> ObjectiveOutput:
        labels = batch["labels"]
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        scored = labels != IGNORE_INDEX
        correct = (out.logits.argmax(dim=-1) == labels) & scored
        accuracy = correct.sum().to(torch.float32) / scored.sum().clamp_min(1)
        return ObjectiveOutput(loss=out.loss, metrics={"accuracy": accuracy.detach()})
