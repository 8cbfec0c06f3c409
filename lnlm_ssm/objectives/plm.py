"""Permutation language modelling: predict tokens in a random factorisation order (XLNet; σ-GPT for causal stacks).

Each batch draws targets and an order per sequence (``data.permutation``:
span-aware by default, as HF's PLM collator, ``max_span_length`` 5 and
``plm_probability`` 1/6; or a random ``1/partial_k`` of the positions, K = 6).

- ``PermutationLM`` (XLNet) gets the order as ``perm_mask`` and the targets as
  ``target_mapping``: the loss is over the targets only (partial prediction).
- ``AnyOrderLM`` (a causal Mamba / hybrid stack) reads the sequence in that
  order, context first, targets last; the loss is over the targets only, as
  XLNet's partial prediction: the early steps of an order see too little
  context to be worth learning from.

Evaluation: ``eval_loss`` (nats per predicted token) and ``eval_bpb``, the same
in bits per byte of source text; not comparable with a causal LM's bpb, as a
token is predicted from context on both sides. The random draws come from
``MaskedLMObjective.mask_generator``: fresh in training (per rank, resumable),
the same at every evaluation.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import nn

from lnlm_ssm.data.permutation import draw_targets, factorisation_orders, xlnet_inputs
from lnlm_ssm.objectives.base import Objective, ObjectiveOutput
from lnlm_ssm.objectives.mlm import MaskedLMObjective
from lnlm_ssm.utils.checks import check_choice


class PLMObjective(Objective):
    """Permutation LM loss of a ``PermutationLM`` or an ``AnyOrderLM``; see the module docstring."""

    name = "plm"
    architectures = ("PermutationLM", "AnyOrderLM")

    def __init__(
        self, *, mode: str = "span", partial_k: int = 6, max_span_length: int = 5, plm_probability: float = 1 / 6
    ) -> None:
        self.mode = check_choice("mode", mode, ("span", "random"))
        self.partial_k = partial_k
        self.max_span_length = max_span_length
        self.plm_probability = plm_probability

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> ObjectiveOutput:
        # The draws are made on the CPU (a Python loop over spans), then moved to the batch's device.
        generator = MaskedLMObjective.mask_generator(model, torch.device("cpu"))
        targets = draw_targets(
            *batch.shape,
            mode=self.mode,
            partial_k=self.partial_k,
            max_span_length=self.max_span_length,
            plm_probability=self.plm_probability,
            generator=generator,
            device=batch.device,
        )
        order = factorisation_orders(targets, generator=generator)
        # Under DDP the model is the wrapper, whose forward must run (it syncs the gradients).
        architecture = getattr(getattr(model, "module", model), "architecture", None)
        if architecture == "PermutationLM":
            drawn = xlnet_inputs(batch, targets, order)
            out = model(batch, perm_mask=drawn.perm_mask, target_mapping=drawn.target_mapping, labels=drawn.labels)
        elif architecture == "AnyOrderLM":
            out = model(batch, order, labels=batch.masked_fill(~targets, -100))
        else:
            raise TypeError(f"the plm objective trains {' or '.join(self.architectures)}; got {type(model).__name__}")
        return ObjectiveOutput(loss=out.loss, metrics={"targets": targets.float().mean()})

    def eval_metrics(
        self, eval_loss: float, bytes_per_token: float, metrics: Optional[Mapping[str, float]] = None
    ) -> dict[str, float]:
        return {"eval_loss": eval_loss, "eval_bpb": eval_loss / math.log(2) / bytes_per_token}
