"""What the fine-tuning objectives add to ``Objective``: the data format they read and the head they need.

A fine-tuning run starts from a checkpoint (``--init-from``) rather than a preset
and reads JSONL rows (``lnlm_ssm.data.finetune``) rather than a corpus. The loop
asks the objective which rows (``data_format``), which model family
(``architectures[0]``, loaded with ``head_arguments``), which TrainConfig fields
it takes (``options``) and whether it needs a frozen reference model.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional

from lnlm_ssm.objectives.base import Objective


class FinetuneObjective(Objective):
    """An objective that fine-tunes a pretrained model on JSONL rows of ``data_format``.

    ``options``: constructor argument -> the TrainConfig field that sets it.
    ``needs_reference``: the loop gives it a frozen copy of the starting model (``reference``).
    Evaluation reports ``eval_loss`` and the mean of each metric the objective returns
    (``eval_accuracy``, ...), which the loop adds.
    """

    data_format: ClassVar[str]
    options: ClassVar[Mapping[str, str]] = {}
    needs_reference: ClassVar[bool] = False
    takes_init_from: ClassVar[bool] = True
    # The best of 3e-3, 1e-3 and 3e-4 on benchmarks/finetune_quality.py's classify task (see the commit that set it).
    default_lr: ClassVar[float] = 1e-3
    reference: Optional[Any] = None

    def head_arguments(self, label2id: Optional[Mapping[str, int]]) -> dict[str, Any]:
        """``from_pretrained`` arguments of the model this objective trains, given the training labels."""
        return {}

    def eval_metrics(
        self, eval_loss: float, bytes_per_token: float, metrics: Optional[Mapping[str, float]] = None
    ) -> dict[str, float]:
        return {"eval_loss": eval_loss, **{f"eval_{k}": v for k, v in (metrics or {}).items()}}


def label_head(label2id: Mapping[str, int]) -> dict[str, Any]:
    """Head arguments for the labels ``label2id`` (name -> id 0..n-1), as HF stores them."""
    return {
        "num_labels": len(label2id),
        "id2label": {str(i): name for name, i in label2id.items()},
        "label2id": dict(label2id),
    }
