"""Writing checkpoints: ``config.json`` + ``model.safetensors``, atomically, in our layout.

``save_pretrained`` takes any model of the registry (``models.base.PretrainedModel``):
it needs ``model.architecture``, ``model.config.to_dict()`` and ``model.tied_weights()``.
A tied weight is stored once, under the name it is tied to.

Each file is written to a temporary file beside it and moved into place
(``utils.files.atomic_path``); the old ``config.json`` is removed after the new
weights are written and before they go in, so an interrupted save leaves the
old checkpoint, the new one, or a directory without ``config.json`` that loading
refuses, never a config paired with the wrong weights.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import save_file

from lnlm_ssm._version import __version__
from lnlm_ssm.checkpoint.load import (
    ARCHITECTURE_KEY,
    CONFIG_NAME,
    MODEL_TYPE,
    VERSION_KEY,
    WEIGHTS_NAME,
    CheckpointError,
)
from lnlm_ssm.utils.files import atomic_path, atomic_write


def save_pretrained(model: torch.nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write ``model`` to ``directory`` as ``config.json`` + ``model.safetensors``; return the directory.

    The directory is created if needed.
    """
    # torch.compile's wrapper prefixes every key with "_orig_mod."; save the model it wraps.
    model = getattr(model, "_orig_mod", model)
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(config, "to_dict") or not hasattr(model, "architecture"):
        raise TypeError(
            f"model must be an lnlm_ssm model such as MambaLM (an nn.Module with .architecture and .config); "
            f"got {type(model).__name__}"
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"directory {str(directory)!r} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)

    tensors = _tensors_to_save(model.state_dict(), model.tied_weights())
    fields = {**config.to_dict(), "model_type": MODEL_TYPE, ARCHITECTURE_KEY: model.architecture,
              VERSION_KEY: __version__}
    config_text = json.dumps(_encode_special_floats(fields), indent=2, allow_nan=False) + "\n"

    with atomic_path(directory / WEIGHTS_NAME) as weights:
        save_file(tensors, weights, metadata={"format": "pt"})
        (directory / CONFIG_NAME).unlink(missing_ok=True)
    atomic_write(directory / CONFIG_NAME, config_text)
    return directory


def _tensors_to_save(state: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    state = dict(state)
    for copy, source in tied.items():
        if copy not in state:
            continue
        head, kept = state.pop(copy), state.get(source)
        # Dropping a weight that is not really tied would silently lose it on the next load.
        if kept is None or not (head.data_ptr() == kept.data_ptr() or torch.equal(head, kept)):
            raise CheckpointError(
                f"the config ties {copy} to {source} (tie_embeddings) but they differ: "
                "tie the weights or set tie_embeddings=False"
            )
    # safetensors wants contiguous CPU tensors that share no memory.
    return {key: t.detach().cpu().contiguous() for key, t in state.items()}


def _encode_special_floats(obj: Any) -> Any:
    # Strict JSON has no inf or nan (dt_limit's default is (0, inf)); write them as transformers >= 5 does.
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": str(obj).replace("inf", "Infinity").replace("nan", "NaN")}
    if isinstance(obj, dict):
        return {k: _encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_special_floats(v) for v in obj]
    return obj
