"""Text-to-text fine-tuning (T5): the encoder reads each row's input, the decoder learns its target.

Rows come from ``--data``, a JSONL file of ``{"input": ..., "target": ...}``
(``data.text_pairs``: its checks, EOS and length rules), not from corpus windows:
``samplers`` gives the loop its own batches, with ``eval_data`` (``--eval-data``)
the held-out rows, else every 10th row of ``--data``. The model is a preset's, new,
or (``--init-from``) a Seq2SeqLM checkpoint's, such as a span-corruption run's
``model/`` or a T5 of HF's, fine-tuned as it is. The loss is the model's cross
entropy over the target tokens (and their EOS); evaluation reports it
(``eval_loss``) and the target-token accuracy (``eval_accuracy``). A preset's model
keeps span corruption's ``extra_ids`` so that it has the vocabulary of a
span-corruption run.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from lnlm_ssm.data.text_pairs import PairSampler
from lnlm_ssm.objectives.base import Objective, ObjectiveOutput
from lnlm_ssm.objectives.mlm import masked_accuracy
from lnlm_ssm.objectives.span import NUM_SENTINELS


class Seq2SeqObjective(Objective):
    """Text-to-text pairs (batches of ``data.text_pairs.pair_batch``); see the module docstring."""

    name = "seq2seq"
    architectures = ("Seq2SeqLM",)
    extra_ids = NUM_SENTINELS
    takes_init_from = True
    options = {"eval_data": "eval_data"}

    def __init__(self, eval_data=None) -> None:
        self._tokenizer = None
        self.eval_data = eval_data

    def use_tokenizer(self, tokenizer) -> None:
        for role in ("eos", "pad"):
            if getattr(tokenizer, f"{role}_token_id", None) is None:
                raise ValueError(f"the {self.name} objective needs a tokenizer with a {role} token; {tokenizer!r} has none")
        self._tokenizer = tokenizer

    def samplers(self, data, *, seq_len: int, batch_size: int, seed: int, rank: int, world_size: int):
        if self._tokenizer is None:
            raise RuntimeError(f"the {self.name} objective has no tokenizer: call use_tokenizer first")
        if data is None or not str(data).endswith(".jsonl"):
            raise ValueError(
                f"the {self.name} objective reads --data, a .jsonl file of {{\"input\": ..., \"target\": ...}} rows; "
                f"got {data!r}"
            )
        kwargs = dict(seq_len=seq_len, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        if self.eval_data is not None:
            return {
                "train": PairSampler(data, None, self._tokenizer, **kwargs),
                "val": PairSampler(self.eval_data, None, self._tokenizer, **kwargs),
            }
        return {split: PairSampler(data, split, self._tokenizer, **kwargs) for split in ("train", "val")}

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> ObjectiveOutput:
        if batch.ndim != 3 or batch.shape[1] != 2:
            raise ValueError(
                f"the {self.name} objective takes batches (batch, 2, seq_len) of text_pairs.pair_batch; "
                f"got shape {tuple(batch.shape)}"
            )
        pad = self._tokenizer.pad_token_id
        input_ids, labels = batch[:, 0], batch[:, 1]
        out = model(input_ids, attention_mask=input_ids != pad, labels=labels)
        return ObjectiveOutput(out.loss, {"accuracy": masked_accuracy(out.logits.detach(), labels)})

    def eval_metrics(
        self, eval_loss: float, bytes_per_token: float, metrics: Optional[Mapping[str, float]] = None
    ) -> dict[str, float]:
        return {"eval_loss": eval_loss, **{f"eval_{k}": v for k, v in (metrics or {}).items()}}
