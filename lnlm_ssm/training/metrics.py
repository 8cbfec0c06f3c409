"""What a run reports: ``metrics.jsonl`` (one JSON object a line), a progress bar, and ``loss.png``.

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

from lnlm_ssm.utils.files import atomic_path, atomic_write

__all__ = ["MetricsLog", "ProgressBar", "plot_losses", "read_metrics"]


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


class ProgressBar:
    """One status line on ``stream`` (stderr): step, a bar, the given fields, elapsed and remaining time.

    On a terminal the line is redrawn in place; elsewhere (a log file, a CI
    console) a full line is written at most every ``log_interval`` seconds and
    at the last step, so logs stay short.
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        stream: Optional[TextIO] = None,
        width: int = 20,
        log_interval: float = 10.0,
    ) -> None:
        self.total = total
        self.initial = initial
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.log_interval = log_interval
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._start = time.perf_counter()
        self._last_line = ""
        self._last_written = -math.inf

    def update(self, step: int, **fields: str) -> None:
        now = time.perf_counter()
        done = step - self.initial
        elapsed = now - self._start
        remaining = elapsed / done * (self.total - step) if done > 0 else math.nan
        filled = int(self.width * step / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        parts = [f"step {step:>{len(str(self.total))}}/{self.total} [{bar}]"]
        parts += [f"{name} {value}" for name, value in fields.items()]
        parts.append(f"{_clock(elapsed)}<{_clock(remaining)}")
        line = " | ".join(parts)
        if self.interactive:
            self.stream.write("\r" + line.ljust(len(self._last_line)))
        elif now - self._last_written >= self.log_interval or step == self.total:
            self.stream.write(line + "\n")
            self._last_written = now
        self._last_line = line
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line above the bar (the bar is redrawn by the next update)."""
        if self.interactive and self._last_line:
            self.stream.write("\r" + " " * len(self._last_line) + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive and self._last_line:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


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
