"""What a run reports: ``metrics.jsonl`` (one JSON object a line), a tqdm progress bar, ``loss.png``, and,
when asked, the same scalars as TensorBoard events.

Rows of ``metrics.jsonl`` have a ``kind``:

- ``"train"``: step, loss, lr, grad_norm, tokens_per_s, tokens (seen so far), elapsed_s;
- ``"eval"``: step, eval_loss, eval_bpb (bits per byte of the held-out text);
- ``"note"``: step, note (something the run wants on record, such as a skipped plot).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO, Union

from tqdm import tqdm

from lnlm_ssm.utils.files import atomic_path, atomic_write

__all__ = ["MetricsLog", "ProgressBar", "TensorBoardLog", "plot_losses", "read_metrics", "require_tensorboard"]


def read_metrics(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (none when it does not exist); a torn last line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line of a run that was killed while writing it
    return rows


class MetricsLog:
    """Appends rows to ``path``, each flushed at once so a killed run keeps what it logged.

    ``resume_step``: the step a resumed run continues from. Rows past it were
    logged by the run that was interrupted after its last checkpoint and will be
    logged again, so they are dropped first.
    """

    def __init__(self, path: Union[str, os.PathLike], *, resume_step: Optional[int] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            atomic_write(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self._file = self.path.open("a")

    def write(self, kind: str, step: int, **values: Any) -> None:
        self._file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def require_tensorboard() -> type:
    """torch's ``SummaryWriter``; an ImportError saying how to install TensorBoard when it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "report_to='tensorboard' needs the tensorboard package, which is not installed: "
            "pip install 'lnlm_ssm[tensorboard]' (or pip install tensorboard)"
        ) from err
    return SummaryWriter


class TensorBoardLog:
    """Scalars of metrics.jsonl's rows as TensorBoard events in ``directory``: ``loss`` of a ``train`` row
    is the scalar ``train/loss`` at global step ``step``.

    ``resume_step`` as for MetricsLog. A run adds its own event file to the
    directory; TensorBoard hides what earlier files hold from the step after
    ``resume_step`` on (from step 1 for a fresh run), as MetricsLog drops those rows.
    """

    def __init__(self, directory: Union[str, os.PathLike], *, resume_step: Optional[int] = None) -> None:
        summary_writer = require_tensorboard()
        self._writer = summary_writer(str(directory), purge_step=(resume_step or 0) + 1)

    def write(self, kind: str, step: int, **values: float) -> None:
        for name, value in values.items():
            self._writer.add_scalar(f"{kind}/{name}", value, step)
        # At once, as metrics.jsonl is, so that a killed run keeps what it logged.
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class ProgressBar:
    """A tqdm bar of the run's steps on ``stream`` (stderr), with the given fields after it.

    On a terminal it is tqdm's live bar, redrawn in place. Elsewhere (a log file,
    a CI console) tqdm's redraws would pile up as one endless line, so the same
    text is written as whole lines instead: at most one every ``log_interval``
    seconds, and always the last step's.
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        stream: Optional[TextIO] = None,
        log_interval: float = 10.0,
    ) -> None:
        self.total = total
        self.initial = initial
        self.stream = sys.stderr if stream is None else stream
        self.log_interval = log_interval
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = (
            tqdm(total=total, initial=initial, file=self.stream, unit="step", bar_format=_BAR_FORMAT,
                 dynamic_ncols=True)
            if self.interactive
            else None
        )
        self._start = time.perf_counter()
        self._last_written = -math.inf

    def update(self, step: int, **fields: str) -> None:
        postfix = ", ".join(f"{name}={value}" for name, value in fields.items())
        if self._bar is not None:
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(step - self._bar.n)
            return
        now = time.perf_counter()
        if now - self._last_written >= self.log_interval or step == self.total:
            line = tqdm.format_meter(step, self.total, now - self._start, ascii=True, unit="step",
                                     bar_format=_BAR_FORMAT, postfix=postfix, initial=self.initial)
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_written = now

    def message(self, text: str) -> None:
        """A line above the bar (on a terminal, tqdm redraws the bar below it)."""
        if self._bar is not None:
            tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# tqdm's usual layout, led by the step count, which is what a reader of a training log looks for first.
_BAR_FORMAT = "step {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def plot_losses(rows: list[dict[str, Any]], path: Union[str, os.PathLike]) -> Optional[str]:
    """Draw the train and eval loss curves of ``rows`` into the PNG ``path``.

    Returns None when drawn, or why not (matplotlib is an optional dependency).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib), so no loss.png"
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("kind") == "eval"]
    # Figure + the Agg canvas, not pyplot: no global backend switch, no GUI, no figure registry.
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train", linewidth=1)
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval (held out)")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats / token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png")
    return None
