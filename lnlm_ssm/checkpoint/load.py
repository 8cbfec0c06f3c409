"""Reading checkpoints from disk: config.json, the weights in any of HF's file layouts, hub repo ids.

A checkpoint is a directory holding ``config.json`` and weights, in the first of
these that exists: ``model.safetensors``; a sharded ``model.safetensors.index.json``
or ``pytorch_model.bin.index.json`` with its shards; ``pytorch_model.bin``.

This module knows files, not models: it returns the config.json dict and the
state dict as stored. Which model they describe, and how a foreign layout's
names map onto ours, is for ``checkpoint.convert`` and ``models.registry``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"

# Our own layout: config.json has model_type "lnlm_ssm", the architecture's name (absent
# before the model registry: those are all MambaLM), the version that wrote it, and the
# config's fields.
MODEL_TYPE = "lnlm_ssm"
ARCHITECTURE_KEY = "architecture"
VERSION_KEY = "lnlm_ssm_version"
# Present only for a model quantised by lnlm_ssm.quantize_: "int8" or "bf16", the format of the
# weights stored. Versions that do not know it refuse the checkpoint (an unknown config field)
# rather than load int8 values as if they were floats.
QUANTIZATION_KEY = "quantization"

# Errors the readers raise on a truncated or garbled file.
_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose config or weights do not describe a model we can build."""


def read_checkpoint(path_or_repo_id: Union[str, os.PathLike]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config.json dict and the state dict (as stored: on CPU, stored dtypes and names) of a checkpoint.

    ``path_or_repo_id``: a directory, or a Hugging Face Hub repo id when
    huggingface_hub is installed.
    """
    directory = resolve(path_or_repo_id)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {str(directory)!r} is not a directory")
    raw = read_json(directory / CONFIG_NAME)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{directory / CONFIG_NAME} must hold a JSON object; got {type(raw).__name__}")
    return raw, read_weights(directory)


def resolve(path_or_repo_id: Union[str, os.PathLike]) -> Path:
    path = Path(path_or_repo_id)
    if path.exists():
        return path
    name = str(path_or_repo_id)
    if not re.fullmatch(r"[\w\-][\w.\-]*(/[\w\-][\w.\-]*)?", name):
        raise CheckpointError(f"checkpoint {name!r} does not exist (and is not a Hugging Face Hub repo id)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise CheckpointError(
            f"checkpoint {name!r} is not a local directory; to download it from the Hugging Face Hub "
            "install huggingface_hub (pip install huggingface_hub)"
        ) from exc
    # Safetensors first; the .bin files only when the repo has no safetensors weights.
    local = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    if not (local / WEIGHTS_NAME).exists() and not (local / SAFETENSORS_INDEX_NAME).exists():
        local = Path(snapshot_download(name, allow_patterns=["*.json", "*.bin"]))
    return local


def read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} not found: a checkpoint directory needs a {CONFIG_NAME}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    try:
        return json.loads(text, object_hook=_decode_special_floats)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def _decode_special_floats(obj: dict) -> Any:
    if obj.keys() == {"__float__"}:
        return float(obj["__float__"])
    return obj


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / WEIGHTS_NAME).exists():
        return _read_file(directory / WEIGHTS_NAME)
    for index in (SAFETENSORS_INDEX_NAME, TORCH_INDEX_NAME):
        if (directory / index).exists():
            return _read_sharded(directory, index)
    if (directory / TORCH_WEIGHTS_NAME).exists():
        return _read_file(directory / TORCH_WEIGHTS_NAME)
    raise CheckpointError(
        f"no weights in {directory}: expected {WEIGHTS_NAME}, {SAFETENSORS_INDEX_NAME}, {TORCH_WEIGHTS_NAME} "
        f"or {TORCH_INDEX_NAME}; found {sorted(p.name for p in directory.iterdir())}"
    )


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.name.endswith(".safetensors"):
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as exc:
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"weights file {path} must hold a dict of str -> Tensor; got {type(state).__name__}")
    return state


def _read_sharded(directory: Path, index_name: str) -> dict[str, torch.Tensor]:
    index = read_json(directory / index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{directory / index_name} must hold a JSON object with a 'weight_map'")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        for key, t in _read_file(directory / shard).items():
            if key in state:
                raise CheckpointError(f"{key!r} is stored in more than one shard of {directory}")
            state[key] = t
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise CheckpointError(f"{directory / index_name} lists weights that no shard holds: {absent}")
    return state
