"""Runs of a sweep (the quality benchmarks' families x learning rates) that share one tokenised corpus."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Union

from lnlm_ssm.training.config import TrainConfig
from lnlm_ssm.training.loop import train


def train_on_prepared(config: TrainConfig, corpus_dir: Union[str, os.PathLike]) -> tuple[dict[str, Any], float]:
    """``train(config)`` on the corpus already tokenised into ``corpus_dir``; its result and wall seconds.

    The loop tokenises into ``<out>/data``; a link to ``corpus_dir`` there has the same fingerprint, so every run of
    a sweep reuses one copy. The training checkpoint (weights and AdamW moments, which only ``--resume`` reads) is
    removed afterwards; the model, metrics and plots stay.
    """
    out = Path(config.out)
    out.mkdir(parents=True)
    (out / "data").symlink_to(Path(corpus_dir).resolve(), target_is_directory=True)
    start = time.perf_counter()
    try:
        result = train(config)
    finally:
        (out / "data").unlink()
    wall = time.perf_counter() - start
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result, wall
