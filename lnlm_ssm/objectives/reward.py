"""Reward model (Bradley-Terry): ``-logsigmoid(r(prompt + chosen) - r(prompt + rejected))`` on a one-label
``SequenceClassifier``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.data.finetune import pair_sequences
from lnlm_ssm.objectives.base import ObjectiveOutput
from lnlm_ssm.objectives.finetune import FinetuneObjective


class RewardObjective(FinetuneObjective):
    """Rows ``{"prompt", "chosen", "rejected"}``; logs ``accuracy`` (r_chosen > r_rejected) and ``margin``."""

    name = "reward"
    architectures = ("SequenceClassifier",)
    data_format = "pairs"

    def head_arguments(self, label2id):
        return {"num_labels": 1, "problem_type": "regression"}

    def __call__(self, model: nn.Module, batch) -> ObjectiveOutput:
        input_ids, mask = pair_sequences(batch)
        rewards = model(input_ids, attention_mask=mask).logits[:, 0].to(torch.float32)
        chosen, rejected = rewards.chunk(2)
        loss = -F.logsigmoid(chosen - rejected).mean()
        metrics = {"accuracy": (chosen > rejected).to(torch.float32).mean(), "margin": (chosen - rejected).mean()}
        return ObjectiveOutput(loss=loss, metrics={k: v.detach() for k, v in metrics.items()})
