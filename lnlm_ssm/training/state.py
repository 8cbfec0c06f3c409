"""Training checkpoints: everything a run needs to continue exactly where it stopped.

``out/checkpoints/step-{N:08d}.pt`` is one ``torch.save`` of a dict::

    format_version   FORMAT_VERSION
    step             optimizer steps done
    model            full (unsharded) model state dict
    optimizer        full optimizer state dict, keyed by parameter name
    sampler          the training sampler's state_dict()
    rng              torch / numpy / python (/ cuda) generator states
    config           TrainConfig.to_dict() of the run that wrote it
    model_config     the model config's to_dict() (of the preset's family)
    progress         counters the loop carries on (tokens seen, ...)
    objective        the training objective's name (absent in checkpoints from before objectives: "clm")

A file is written to a temporary name in the same directory, fsynced and
renamed, so a file with the final name is always complete: a run killed while
saving leaves the previous checkpoints and a stray temporary file, which the
next save removes. Everything stored is plain tensors and Python values, so
loading uses ``torch.load(weights_only=True)``: no code from the file runs.

The final model for inference is not this: it goes to ``out/model`` through
``lnlm_ssm.checkpoint.save_pretrained``.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from lnlm_ssm.utils.checks import check_positive_int
from lnlm_ssm.utils.files import atomic_path

__all__ = [
    "FORMAT_VERSION",
    "TrainCheckpointError",
    "capture_rng",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "step", "model", "optimizer", "sampler", "rng", "config", "model_config")

_NAME = re.compile(r"step-(\d{8,})\.pt")
# utils.files.atomic_path's temporary names for step-*.pt.
_TEMP_PREFIX = ".step-"
_TEMP_SUFFIX = ".tmp"

PathLike = Union[str, os.PathLike]


class TrainCheckpointError(ValueError):
    """A training checkpoint that is missing, unreadable, or does not fit the run resuming from it."""


def checkpoint_path(directory: PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def list_checkpoints(directory: PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``directory``, oldest first (none if it does not exist)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """The newest checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(directory: PathLike, state: dict[str, Any], *, keep_last: int) -> Path:
    """Write ``state`` as ``directory/step-{state['step']:08d}.pt`` atomically; keep the newest ``keep_last``.

    Returns the path written. ``state`` must hold every key of ``REQUIRED_KEYS``
    except ``format_version``, which is added.
    """
    check_positive_int("keep_last", keep_last)
    missing = [k for k in REQUIRED_KEYS if k != "format_version" and k not in state]
    if missing:
        raise ValueError(f"state is missing {missing}; a training checkpoint holds {list(REQUIRED_KEYS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, state["step"])
    with atomic_path(path) as temp, open(temp, "wb") as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)
    _prune(directory, keep_last, keep=path)
    return path


def _prune(directory: Path, keep_last: int, keep: Path) -> None:
    for _, old in list_checkpoints(directory)[:-keep_last]:
        if old != keep:
            old.unlink(missing_ok=True)
    # Temporary files are left only by saves that were killed: one process writes checkpoints.
    for stray in directory.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
        stray.unlink(missing_ok=True)


def load_checkpoint(path: PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a training checkpoint; a TrainCheckpointError naming ``path`` if it is not a complete one."""
    path = Path(path)
    if not path.is_file():
        raise TrainCheckpointError(f"training checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    # A truncated or garbled file fails anywhere inside torch's zip and unpickling
    # layers, each with its own exception type; all of them mean the same here.
    except Exception as err:
        raise TrainCheckpointError(
            f"training checkpoint {path} is corrupt or incomplete ({type(err).__name__}: {err}); "
            "delete it to resume from the checkpoint before it"
        ) from err
    if not isinstance(state, dict):
        raise TrainCheckpointError(f"training checkpoint {path} holds a {type(state).__name__}, not a dict")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise TrainCheckpointError(f"training checkpoint {path} is missing {missing}: it is not a complete checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise TrainCheckpointError(
            f"training checkpoint {path} has format_version {state['format_version']!r}; this version of "
            f"lnlm_ssm reads format_version {FORMAT_VERSION}"
        )
    return state


# --------------------------------------------------------------------------- random generators


def capture_rng() -> dict[str, Any]:
    """The state of every generator a training step might draw from, as plain tensors and Python values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what ``capture_rng`` returned (CUDA states only when this process uses CUDA)."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
