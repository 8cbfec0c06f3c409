"""Writing checkpoints: ``config.json`` + ``model.safetensors`` and a model card, ``README.md``, atomically,
in our layout.

``save_pretrained`` takes any model of the registry (``models.base.PretrainedModel``):
it needs ``model.architecture``, ``model.config.to_dict()`` and ``model.tied_weights()``.
A tied weight is stored once, under the name it is tied to. A model quantised by
``lnlm_ssm.quantize_`` is stored as it is (int8 weights with their fp32 scales, or
bf16 weights), and config.json records ``model.quantization``.

The model card is a README.md as the Hugging Face Hub shows one: the
architecture, the parameter count, the config and, when the caller gives them
(a training run does), facts about how the weights were made. Loading ignores it.

Each file is written to a temporary file beside it and moved into place
(``utils.files.atomic_path``). The old card is removed first; the old
``config.json`` after the new weights are written and before they go in; the new
config and then the new card come last. So an interrupted save leaves the old
checkpoint (without its card), the new one (perhaps without its card), or a
directory without ``config.json`` that loading refuses, never a config or a card
beside weights they do not describe. A README.md that save_pretrained did not
write (it lacks ``CARD_MARKER``) is someone's own: it is left alone, and no card
is written.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors.torch import save_file

from lnlm_ssm._version import __version__
from lnlm_ssm.checkpoint.load import (
    ARCHITECTURE_KEY,
    CONFIG_NAME,
    MODEL_TYPE,
    QUANTIZATION_KEY,
    VERSION_KEY,
    WEIGHTS_NAME,
    CheckpointError,
)
from lnlm_ssm.utils.files import atomic_path, atomic_write

CARD_NAME = "README.md"
# How a save tells its own card, which describes the old weights and is replaced, from a README.md someone wrote.
CARD_MARKER = (
    "<!-- Written by lnlm_ssm's save_pretrained for the weights beside it; "
    "the next save replaces it unless this line is removed. -->"
)


def save_pretrained(
    model: torch.nn.Module, directory: Union[str, os.PathLike], *, card: Optional[Mapping[str, Any]] = None
) -> Path:
    """Write ``model`` to ``directory`` as ``config.json`` + ``model.safetensors`` + ``README.md``; return the
    directory.

    The directory is created if needed. ``card``: facts about how the weights
    were made (a training run gives its data, tokens seen, final evaluation and
    command), listed in this order under the card's "Training" heading as
    ``- name: value``: strings as they are (markdown), ints with thousands
    separators, floats to 6 significant digits. Without it the card has the
    architecture, the parameter count and the config.
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
    quantization = getattr(model, "quantization", None)
    if quantization is not None:
        fields[QUANTIZATION_KEY] = quantization
    config_text = json.dumps(_encode_special_floats(fields), indent=2, allow_nan=False) + "\n"
    card_path = directory / CARD_NAME
    card_is_ours = not card_path.exists() or CARD_MARKER in card_path.read_text(errors="replace")
    if card_is_ours:
        card_path.unlink(missing_ok=True)
    else:
        warnings.warn(
            f"{card_path} was not written by save_pretrained: it is kept, and no model card is written "
            "(move it away to get one)",
            stacklevel=2,
        )

    with atomic_path(directory / WEIGHTS_NAME) as weights:
        save_file(tensors, weights, metadata={"format": "pt"})
        (directory / CONFIG_NAME).unlink(missing_ok=True)
    atomic_write(directory / CONFIG_NAME, config_text)
    if card_is_ours:
        atomic_write(card_path, _model_card(model, config_text, card))
    return directory


def _model_card(model: torch.nn.Module, config_text: str, card: Optional[Mapping[str, Any]]) -> str:
    # parameters() yields a tied weight once, so it counts once.
    count = sum(p.numel() for p in model.parameters())
    quantization = getattr(model, "quantization", None)
    weights = "" if quantization is None else f", its weights quantised to {quantization} (weight-only)"
    lines = [
        # The Hub reads this front matter; without it, it flags the card as missing its metadata.
        "---",
        "library_name: lnlm_ssm",
        "---",
        CARD_MARKER,
        "",
        f"# {model.architecture}",
        "",
        f"A {model.architecture} with {count:,} parameters{weights}, saved by lnlm_ssm {__version__}. Load it with "
        "`lnlm_ssm.from_pretrained(path)`.",
        "",
        f"## Config ({CONFIG_NAME})",
        "",
        "```json",
        config_text.rstrip("\n"),
        "```",
    ]
    if card:
        lines += ["", "## Training", ""] + [f"- {name}: {_card_value(value)}" for name, value in card.items()]
    return "\n".join(lines) + "\n"


def _card_value(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


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
