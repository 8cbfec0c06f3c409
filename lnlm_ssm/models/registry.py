"""The model registry: architecture name -> config class, model class and the converters it reads.

A family registers itself once, in its own module::

    register(MambaLM, MambaLMConfig, converters=(mamba_ssm.CONVERTER, hf_mamba.CONVERTER, ...),
             presets={"mamba-tiny": {...}, ...})

``preset(name)`` then gives the config of any family's named preset (what
``lnlm-ssm train --preset`` builds), and ``from_pretrained``
(``lnlm_ssm.from_pretrained``) builds whatever a checkpoint holds: our layout names its architecture in config.json (checkpoints
written before the registry name none, and are all ``MambaLM``); a foreign layout
is recognised by the first registered converter that matches its config.json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch

from lnlm_ssm.checkpoint.convert import Converter
from lnlm_ssm.checkpoint.load import (
    ARCHITECTURE_KEY,
    MODEL_TYPE,
    QUANTIZATION_KEY,
    VERSION_KEY,
    CheckpointError,
    read_checkpoint,
)
from lnlm_ssm.layers.quantized import QUANTIZATION_MODES, quantize_
from lnlm_ssm.models.config import ConfigError

# What checkpoints written before the registry hold (they name no architecture).
LEGACY_ARCHITECTURE = "MambaLM"


@dataclass(frozen=True)
class Architecture:
    name: str
    config_class: type
    model_class: type
    converters: tuple[Converter, ...]
    presets: Mapping[str, Mapping[str, Any]]


_ARCHITECTURES: dict[str, Architecture] = {}


def register(
    model_class: type,
    config_class: type,
    converters: tuple[Converter, ...] = (),
    presets: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> None:
    """Register ``model_class`` (its ``architecture`` names it) with its config class, foreign layouts and
    named presets (preset name -> config fields; names are unique across families)."""
    name = model_class.architecture
    if name in _ARCHITECTURES and _ARCHITECTURES[name].model_class is not model_class:
        raise ValueError(f"architecture {name!r} is registered already, by {_ARCHITECTURES[name].model_class}")
    presets = dict(presets or {})
    for entry in _ARCHITECTURES.values():
        taken = sorted(set(presets) & set(entry.presets)) if entry.name != name else []
        if taken:
            raise ValueError(f"presets {taken} of {name} are registered already, by {entry.name}")
    _ARCHITECTURES[name] = Architecture(name, config_class, model_class, tuple(converters), presets)


def architectures() -> dict[str, Architecture]:
    """Every registered architecture, by name."""
    return dict(_ARCHITECTURES)


def preset_names() -> list[str]:
    """The names of every family's presets, sorted."""
    return sorted(name for entry in _ARCHITECTURES.values() for name in entry.presets)


def preset_architecture(name: str) -> Architecture:
    """The architecture whose preset ``name`` is."""
    for entry in _ARCHITECTURES.values():
        if name in entry.presets:
            return entry
    raise ConfigError(f"unknown preset {name!r}; choose from {preset_names()}")


def preset(name: str, **overrides: Any):
    """The config of the preset ``name`` (of any family), with fields replaced by ``overrides``.

    An unknown field is a ConfigError naming it.
    """
    entry = preset_architecture(name)
    return entry.config_class.from_dict({**entry.presets[name], **overrides})


def from_pretrained(
    path_or_repo_id: Union[str, os.PathLike],
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    strict: bool = True,
    expect: Optional[type] = None,
):
    """The model a checkpoint directory (any registered layout) or a Hugging Face Hub repo id holds.

    A path that does not exist locally is downloaded with ``huggingface_hub``
    when it is installed and looks like a repo id (``name`` or ``org/name``).
    ``dtype`` defaults to the dtype the model's main weight (its embedding) is
    stored in; ``device`` to torch's default. With ``strict`` (the default) every
    weight of the model must be in the checkpoint and every weight of the
    checkpoint must be used; with ``strict=False`` missing weights keep their
    initial values and extra ones are ignored. Shapes must always match.
    ``expect``: a model class the checkpoint's must be (or subclass).

    A checkpoint of a quantised model (config.json's ``quantization``) comes back
    quantised as it was saved (``lnlm_ssm.quantize_``), in float32.
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None; got {dtype!r}")
    raw, state = read_checkpoint(path_or_repo_id)
    entry, layout, fields, state = _interpret(raw, state)
    quantization = raw.get(QUANTIZATION_KEY) if layout == MODEL_TYPE else None
    if quantization is not None:
        if quantization not in QUANTIZATION_MODES:
            raise CheckpointError(
                f"config.json records the quantization {quantization!r}, which this version of lnlm_ssm does not "
                f"know; it knows {list(QUANTIZATION_MODES)}"
            )
        if dtype not in (None, torch.float32):
            raise CheckpointError(
                f"{str(path_or_repo_id)!r} holds a model quantised to {quantization}, which computes in float32; "
                f"got dtype={dtype}"
            )
        dtype = torch.float32
    if expect is not None and not issubclass(entry.model_class, expect):
        raise CheckpointError(
            f"{str(path_or_repo_id)!r} holds a {entry.name}, not a {expect.__name__}: load it with "
            f"{entry.name}.from_pretrained or lnlm_ssm.from_pretrained"
        )
    try:
        config = entry.config_class.from_dict(fields)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"config.json of a {layout} checkpoint: {exc}") from exc
    if dtype is None:
        main = state.get(entry.model_class.main_weight)
        dtype = main.dtype if main is not None and main.is_floating_point() else None
    try:
        model = entry.model_class(config, device=device, dtype=dtype)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the config of {str(path_or_repo_id)!r} describes no model lnlm_ssm can build: {exc}"
        ) from exc
    if quantization is not None:
        quantize_(model, quantization)  # the quantised layout; the stored weights replace its values
    _load_state(model, state, strict)
    return model


def _interpret(raw: dict, state: dict) -> tuple[Architecture, str, dict, dict]:
    """(architecture, layout name, our config fields, state with our names) of a config.json and its weights."""
    if raw.get("model_type") == MODEL_TYPE:
        name = raw.get(ARCHITECTURE_KEY, LEGACY_ARCHITECTURE)
        if name not in _ARCHITECTURES:
            raise CheckpointError(
                f"config.json names the architecture {name!r}, which this version of lnlm_ssm does not have; "
                f"it has {sorted(_ARCHITECTURES)}"
            )
        fields = {
            k: v for k, v in raw.items() if k not in ("model_type", ARCHITECTURE_KEY, VERSION_KEY, QUANTIZATION_KEY)
        }
        return _ARCHITECTURES[name], MODEL_TYPE, fields, state
    for entry in _ARCHITECTURES.values():
        for converter in entry.converters:
            if converter.matches(raw):
                fields = converter.config(raw)
                return entry, converter.layout, fields, converter.state(state, fields)
    model_type = raw.get("model_type")
    readable = sorted(
        name for a in _ARCHITECTURES.values() for c in a.converters if c.model_type == model_type
        for name in c.architectures
    )
    if readable:
        raise CheckpointError(
            f"config.json of a {model_type!r} checkpoint lists the architectures {raw.get('architectures')!r}; "
            f"lnlm_ssm reads the {model_type!r} architectures {readable}"
        )
    known = sorted({c.model_type for a in _ARCHITECTURES.values() for c in a.converters if c.model_type})
    found = f"model_type {model_type!r}" if model_type is not None else f"fields {sorted(raw)}"
    raise CheckpointError(
        f"unknown checkpoint layout: config.json has {found}; expected model_type {MODEL_TYPE!r}, one of the "
        f"HF model types {known}, or mamba_ssm's fields (d_model, n_layer, ssm_cfg, ...)"
    )


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool) -> None:
    state = dict(state)
    expected = model.state_dict()
    for copy, source in model.tied_weights().items():
        if source not in state:
            continue
        # Tied weights are stored once (ours, HF) or twice (mamba_ssm's torch.save); both copies must agree.
        stored = state.pop(copy, None)
        if stored is not None and not torch.equal(stored, state[source]):
            raise CheckpointError(f"the config ties {copy} to {source} but the checkpoint's {copy} differs from it")
        if copy in expected:
            state[copy] = state[source]
    # Checked first, as the cause of the key mismatches that come with it: load_state_dict
    # would convert int8 values to floats (or floats to int8) without a word.
    kinds = [
        f"{key}: the model holds {_dtype_name(expected[key])}, the checkpoint {_dtype_name(t)}"
        for key, t in state.items()
        if key in expected and t.is_floating_point() != expected[key].is_floating_point()
    ]
    if kinds:
        more = f"; and {len(kinds) - 3} more" if len(kinds) > 3 else ""
        raise CheckpointError(
            "the checkpoint's weights are not stored as its config.json describes (a quantised model's config.json "
            f"records its '{QUANTIZATION_KEY}'): " + "; ".join(kinds[:3]) + more
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointError(
            "the checkpoint's weights do not match the model its config describes: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    mismatched = [
        f"{key}: expected {tuple(expected[key].shape)}, found {tuple(t.shape)}"
        for key, t in state.items()
        if key in expected and t.shape != expected[key].shape
    ]
    if mismatched:
        raise CheckpointError("shape mismatch between the checkpoint and its config: " + "; ".join(mismatched))
    for key in unexpected:
        del state[key]
    model.load_state_dict(state, strict=False)
