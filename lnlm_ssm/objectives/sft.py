"""Supervised fine-tuning: next-token cross entropy on the completion only (the prompt's labels are -100)."""

from __future__ import annotations

from torch import nn

from lnlm_ssm.objectives.base import ObjectiveOutput
from lnlm_ssm.objectives.finetune import FinetuneObjective


class SFTObjective(FinetuneObjective):
    """Rows ``{"prompt", "completion"}``: the mean loss over the completion tokens (and the eos after them)."""

    name = "sft"
    architectures = ("MambaLM",)
    data_format = "sft"

    def __call__(self, model: nn.Module, batch) -> ObjectiveOutput:
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return ObjectiveOutput(loss=out.loss)
