"""Converters from foreign checkpoint layouts to ours: one module per layout.

A converter is pure data: it maps a foreign config.json onto our config's fields
and the foreign state dict's names and shapes onto ours. It imports no model.
Each model family lists the converters it can be built from when it registers
(``models.registry.register``); ``lnlm_ssm.from_pretrained`` detects the layout
from config.json and applies its converter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from lnlm_ssm.checkpoint.load import CheckpointError

Fields = dict[str, Any]
State = dict[str, torch.Tensor]


def _same_state(state: State, fields: Fields) -> State:
    return state


@dataclass(frozen=True)
class Converter:
    """How to read one foreign layout.

    - ``layout``: its name in messages ("HF mamba", "mamba_ssm", ...);
    - ``model_type``: the config.json ``model_type`` that identifies it (None: ``detect`` decides alone);
    - ``config``: config.json dict -> our config's fields (raises CheckpointError naming a field it cannot map);
    - ``state``: (its state dict, our fields) -> a state dict with our names and shapes;
    - ``detect``: for layouts without a ``model_type``, whether a config.json dict is theirs;
    - ``architectures``: when the same ``model_type`` holds several models (HF ``BertModel``,
      ``BertForMaskedLM``), the config.json ``architectures`` this converter reads (one must be listed there).
    """

    layout: str
    model_type: str | None
    config: Callable[[dict], Fields]
    state: Callable[[State, Fields], State] = _same_state
    detect: Callable[[dict], bool] | None = None
    architectures: tuple[str, ...] = ()

    def matches(self, raw: dict) -> bool:
        if self.model_type is not None:
            if raw.get("model_type") != self.model_type:
                return False
            listed = raw.get("architectures") or ()
            return not self.architectures or any(name in listed for name in self.architectures)
        return self.detect is not None and self.detect(raw)


def require(config: dict[str, Any], key: str, layout: str) -> Any:
    """``config[key]``, or a CheckpointError naming the field the ``layout`` checkpoint lacks."""
    if key not in config:
        raise CheckpointError(f"config.json of a {layout} checkpoint lacks the field {key!r}")
    return config[key]


def rename_prefix(state: State, old: str, new: str) -> State:
    """``state`` with every key starting with ``old`` starting with ``new`` instead."""
    return {new + key[len(old):] if key.startswith(old) else key: t for key, t in state.items()}
