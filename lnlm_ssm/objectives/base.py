"""The Objective interface: what a training loop asks of a training objective.

An objective turns ``(model, batch)`` into a loss and named metrics, and the mean
held-out loss into the evaluation figures it reports. The loop knows nothing
else of it: a new objective (masked LM, span corruption, DPO, ...) is a new
subclass here and one line in ``objectives.OBJECTIVES``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Optional

import torch
from torch import nn


@dataclass
class ObjectiveOutput:
    """``loss``: the scalar to minimise (a mean over the batch); ``metrics``: named scalars to log."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(abc.ABC):
    """A training objective; ``name`` is what checkpoints record and ``--objective`` takes.

    ``architectures``: the names of the model families it trains (``architecture``
    of a ``models.PretrainedModel``); the loop refuses a preset of any other family
    before it starts (an MLM objective has nothing to train on a causal LM).
    """

    name: str
    architectures: ClassVar[tuple[str, ...]]
    # Ids the objective uses above the tokenizer's (span corruption's sentinels): the loop gives the model a
    # vocabulary this much larger than the tokenizer's.
    extra_ids: ClassVar[int] = 0
    # Whether a run may start from a checkpoint (--init-from) instead of a preset; fine-tuning objectives must.
    takes_init_from: ClassVar[bool] = False
    # The peak learning rate of a run that gives none (TrainConfig.lr).
    default_lr: ClassVar[float] = 3e-3

    @abc.abstractmethod
    def __call__(self, model: nn.Module, batch: torch.Tensor) -> ObjectiveOutput:
        """The loss (and metrics) of ``model`` on ``batch`` (batch, seqlen) of token ids."""

    def use_tokenizer(self, tokenizer) -> None:
        """Called by the loop with the corpus's tokenizer before the first batch. Objectives that need its
        special tokens ([MASK], [CLS], ...) take them here, and raise a ValueError naming the tokenizer
        when it lacks one; the default needs none."""

    def samplers(self, data, *, seq_len: int, batch_size: int, seed: int, rank: int, world_size: int):
        """None (the default): the objective trains on the loop's corpus windows. An objective that reads its own
        data from ``data`` (the --data path) returns {"train": sampler, "val": sampler}, each with
        ``next_batch()``, ``eval_batches(n)``, ``state_dict()`` and ``load_state_dict(state)`` as
        ``data.sampler.WindowSampler``'s; called after ``use_tokenizer``."""
        return None

    @abc.abstractmethod
    def eval_metrics(
        self, eval_loss: float, bytes_per_token: float, metrics: Optional[Mapping[str, float]] = None
    ) -> dict[str, float]:
        """The evaluation figures of a mean held-out loss (``eval_loss`` among them); ``metrics``: the held-out
        means of the metrics ``__call__`` returned."""
