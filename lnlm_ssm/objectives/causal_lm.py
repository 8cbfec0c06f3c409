"""Causal language modelling: predict every next token; evaluated in bits per byte."""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import nn

from lnlm_ssm.objectives.base import Objective, ObjectiveOutput


class CausalLMObjective(Objective):
    """Mean next-token cross entropy over the batch (the model shifts the labels: ``model(ids, labels=ids)``).

    Evaluation: ``eval_loss`` (nats per token) and ``eval_bpb``, bits per byte
    of the source text, which compares runs across tokenizers.
    """

    name = "clm"
    architectures = ("MambaLM",)

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> ObjectiveOutput:
        return ObjectiveOutput(loss=model(batch, labels=batch).loss)

    def eval_metrics(
        self, eval_loss: float, bytes_per_token: float, metrics: Optional[Mapping[str, float]] = None
    ) -> dict[str, float]:
        return {"eval_loss": eval_loss, "eval_bpb": eval_loss / math.log(2) / bytes_per_token}
