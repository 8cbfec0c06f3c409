"""Checkpoints of MambaLM: our format, mamba_ssm's and HF transformers' (Mamba, Mamba-2, Llama).

A checkpoint is a directory holding ``config.json`` and weights. ``load_pretrained``
tells the layout from ``config.json``:

====================  ==========================================  =================================
layout                config.json                                  weights
====================  ==========================================  =================================
ours                  MambaLMConfig fields, ``model_type``         ``model.safetensors``
                      ``"lnlm_ssm"``
mamba_ssm             d_model, n_layer, ssm_cfg, ... (its          ``pytorch_model.bin``
                      MambaConfig)
HF transformers       ``model_type`` mamba / mamba2 / llama        ``model.safetensors``, sharded
                                                                   ``model-0000i-of-0000n.safetensors``
                                                                   + index, or ``pytorch_model.bin``
                                                                   (+ index)
====================  ==========================================  =================================

Any layout's weights may be in any of those files; the first found in the order
of the last column is read. Our state-dict keys are mamba_ssm's, so ours and
mamba_ssm's load as they are; HF Mamba / Mamba-2 differ by one name
(``backbone.embeddings``), and Llama's attention and MLP projections are
concatenated into our ``in_proj`` (rows [q, k, v]) and ``fc1`` (rows [up, gate]).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lnlm_ssm import __version__
from lnlm_ssm.models.config import ConfigError, MambaLMConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
MODEL_TYPE = "lnlm_ssm"
VERSION_KEY = "lnlm_ssm_version"

EMBEDDING_KEY = "backbone.embedding.weight"
LM_HEAD_KEY = "lm_head.weight"

# Errors the readers raise on a truncated or garbled file.
_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose config or weights do not describe a MambaLM."""


# --------------------------------------------------------------------------- saving


def save_pretrained(model: torch.nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write ``model`` to ``directory`` as ``config.json`` + ``model.safetensors``; return the directory.

    A tied ``lm_head.weight`` is stored once, as the embedding. The directory is
    created if needed. Each file is written to a temporary file beside it and
    moved into place; the old ``config.json`` is removed before the new weights
    go in, so an interrupted save leaves the old checkpoint, the new one, or a
    directory without ``config.json`` that ``load_pretrained`` refuses, never a
    config paired with the wrong weights.
    """
    # torch.compile's wrapper prefixes every key with "_orig_mod."; save the model it wraps.
    model = getattr(model, "_orig_mod", model)
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or not isinstance(config, MambaLMConfig):
        raise TypeError(
            f"model must be an nn.Module with a MambaLMConfig as .config (a MambaLM); got {type(model).__name__}"
        )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"directory {str(directory)!r} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)

    tensors = _tensors_to_save(model.state_dict(), config)
    fields = {**config.to_dict(), "model_type": MODEL_TYPE, VERSION_KEY: __version__}
    config_text = json.dumps(_encode_special_floats(fields), indent=2, allow_nan=False)

    weights_tmp = _temp_path(directory, WEIGHTS_NAME)
    config_tmp = _temp_path(directory, CONFIG_NAME)
    try:
        save_file(tensors, weights_tmp, metadata={"format": "pt"})
        _fsync(weights_tmp)
        with open(config_tmp, "w") as f:
            f.write(config_text + "\n")
            f.flush()
            os.fsync(f.fileno())
        (directory / CONFIG_NAME).unlink(missing_ok=True)
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)
        _fsync_directory(directory)
    finally:
        for tmp in (weights_tmp, config_tmp):
            if os.path.exists(tmp):
                os.unlink(tmp)
    return directory


def _tensors_to_save(state: dict[str, torch.Tensor], config: MambaLMConfig) -> dict[str, torch.Tensor]:
    state = dict(state)
    if config.tie_embeddings and LM_HEAD_KEY in state:
        head, embedding = state.pop(LM_HEAD_KEY), state.get(EMBEDDING_KEY)
        # Dropping an untied head would silently lose weights on the next load.
        if embedding is None or not (head.data_ptr() == embedding.data_ptr() or torch.equal(head, embedding)):
            raise CheckpointError(
                f"model.config.tie_embeddings is set but {LM_HEAD_KEY} is not {EMBEDDING_KEY}: "
                "tie the weights or set tie_embeddings=False"
            )
    # safetensors wants contiguous CPU tensors that share no memory.
    return {key: t.detach().cpu().contiguous() for key, t in state.items()}


def _temp_path(directory: Path, name: str) -> str:
    fd, path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return path


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_directory(directory: Path) -> None:
    # Makes the renames durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- loading


def load_pretrained(
    path_or_repo_id: Union[str, os.PathLike],
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    strict: bool = True,
):
    """A MambaLM built from a checkpoint directory (any layout above) or a Hugging Face Hub repo id.

    A path that does not exist locally is downloaded with ``huggingface_hub``
    when it is installed and looks like a repo id (``name`` or ``org/name``).
    ``dtype`` defaults to the dtype the embedding is stored in; ``device`` to
    torch's default. With ``strict`` (the default) every weight of the model
    must be in the checkpoint and every weight of the checkpoint must be used;
    with ``strict=False`` missing weights keep their initial values and extra
    ones are ignored. Shapes must always match.
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None; got {dtype!r}")
    config, state = read_checkpoint(_resolve(path_or_repo_id))
    if dtype is None:
        embedding = state.get(EMBEDDING_KEY)
        dtype = embedding.dtype if embedding is not None and embedding.is_floating_point() else None

    # Imported here: lm.py imports this module for MambaLM.save_pretrained / from_pretrained.
    from lnlm_ssm.models.lm import MambaLM

    try:
        model = MambaLM(config, device=device, dtype=dtype)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"the config of {str(path_or_repo_id)!r} describes no model lnlm_ssm can build: {exc}"
        ) from exc
    _load_state(model, state, config, strict=strict)
    return model


def read_checkpoint(directory: Union[str, os.PathLike]) -> tuple[MambaLMConfig, dict[str, torch.Tensor]]:
    """The config and the state dict (our key names, on CPU, stored dtypes) of a checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {str(directory)!r} is not a directory")
    raw = _read_json(directory / CONFIG_NAME)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{directory / CONFIG_NAME} must hold a JSON object; got {type(raw).__name__}")
    layout = detect_layout(raw)
    config = _CONFIG_CONVERTERS[layout](raw)
    state = _read_weights(directory)
    if layout in ("mamba", "mamba2"):
        state = {_rename_prefix(key, "backbone.embeddings.", "backbone.embedding."): t for key, t in state.items()}
    elif layout == "llama":
        state = _llama_state(state, config.d_intermediate)
    return config, state


def detect_layout(config: dict[str, Any]) -> str:
    """"lnlm_ssm", "mamba_ssm", or the HF ``model_type`` ("mamba", "mamba2", "llama") of a config.json dict."""
    model_type = config.get("model_type")
    if model_type == MODEL_TYPE or model_type in _HF_CONVERTERS:
        return model_type
    if model_type is None and {"d_model", "n_layer"} <= config.keys():
        return "mamba_ssm"
    found = f"model_type {model_type!r}" if model_type is not None else f"fields {sorted(config)}"
    raise CheckpointError(
        f"unknown checkpoint layout: config.json has {found}; expected model_type {MODEL_TYPE!r}, one of the "
        f"HF model types {sorted(_HF_CONVERTERS)}, or mamba_ssm's fields (d_model, n_layer, ssm_cfg, ...)"
    )


def _resolve(path_or_repo_id: Union[str, os.PathLike]) -> Path:
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


def _read_json(path: Path) -> Any:
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


def _encode_special_floats(obj: Any) -> Any:
    # Strict JSON has no inf or nan (dt_limit's default is (0, inf)); write them as transformers >= 5 does.
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": str(obj).replace("inf", "Infinity").replace("nan", "NaN")}
    if isinstance(obj, dict):
        return {k: _encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_special_floats(v) for v in obj]
    return obj


def _decode_special_floats(obj: dict) -> Any:
    if obj.keys() == {"__float__"}:
        return float(obj["__float__"])
    return obj


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
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
    index = _read_json(directory / index_name)
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


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], config: MambaLMConfig, strict: bool) -> None:
    state = dict(state)
    expected = model.state_dict()
    if config.tie_embeddings and EMBEDDING_KEY in state:
        # Tied heads are stored once (ours, HF) or twice (mamba_ssm's torch.save); both must be the embedding.
        head = state.pop(LM_HEAD_KEY, None)
        if head is not None and not torch.equal(head, state[EMBEDDING_KEY]):
            raise CheckpointError(
                f"the config ties the embeddings but the checkpoint's {LM_HEAD_KEY} differs from {EMBEDDING_KEY}"
            )
        if LM_HEAD_KEY in expected:
            state[LM_HEAD_KEY] = state[EMBEDDING_KEY]
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


def _rename_prefix(key: str, old: str, new: str) -> str:
    return new + key[len(old) :] if key.startswith(old) else key


# --------------------------------------------------------------------------- config converters


def _require(config: dict[str, Any], key: str, layout: str) -> Any:
    if key not in config:
        raise CheckpointError(f"config.json of a {layout} checkpoint lacks the field {key!r}")
    return config[key]


def _checked_config(fields: dict[str, Any], layout: str) -> MambaLMConfig:
    try:
        return MambaLMConfig(**fields)
    except ConfigError as exc:
        raise CheckpointError(f"config.json of a {layout} checkpoint: {exc}") from exc


def _config_from_ours(raw: dict[str, Any]) -> MambaLMConfig:
    fields = {k: v for k, v in raw.items() if k not in ("model_type", VERSION_KEY)}
    try:
        return MambaLMConfig.from_dict(fields)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"config.json of an {MODEL_TYPE} checkpoint: {exc}") from exc


def _config_from_mamba_ssm(raw: dict[str, Any]) -> MambaLMConfig:
    # fused_add_norm picks a kernel in mamba_ssm; the numbers are the same without it.
    fields = {k: v for k, v in raw.items() if k != "fused_add_norm"}
    attn_cfg = dict(fields.get("attn_cfg") or {})
    if attn_cfg.get("mlp_dim", 0) == 0:
        # mamba_ssm writes mlp_dim=0 for "no MLP inside the attention block", our Attention has none.
        attn_cfg.pop("mlp_dim", None)
    fields["attn_cfg"] = attn_cfg
    try:
        return MambaLMConfig.from_dict(fields)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"config.json of a mamba_ssm checkpoint: {exc}") from exc


def _check_silu(raw: dict[str, Any], layout: str) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(
            f"config.json of a HF {layout} checkpoint has hidden_act {act!r}; only 'silu' is supported"
        )


def _hf_common(raw: dict[str, Any], layout: str) -> dict[str, Any]:
    return dict(
        d_model=_require(raw, "hidden_size", layout),
        n_layer=_require(raw, "num_hidden_layers", layout),
        vocab_size=_require(raw, "vocab_size", layout),
        # HF checkpoints pad the vocabulary in vocab_size itself: keep exactly vocab_size logits.
        pad_vocab_size_multiple=1,
    )


def _config_from_hf_mamba(raw: dict[str, Any]) -> MambaLMConfig:
    _check_silu(raw, "mamba")
    d_model = _require(raw, "hidden_size", "mamba")
    dt_rank = raw.get("time_step_rank", "auto")
    ssm_cfg = dict(
        layer="Mamba1",
        d_state=raw.get("state_size", 16),
        d_conv=raw.get("conv_kernel", 4),
        expand=raw.get("expand", 2),
        dt_rank=math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank,
        bias=raw.get("use_bias", False),
        conv_bias=raw.get("use_conv_bias", True),
    )
    return _checked_config(
        dict(
            _hf_common(raw, "mamba"),
            ssm_cfg=ssm_cfg,
            norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
            residual_in_fp32=raw.get("residual_in_fp32", True),
            tie_embeddings=raw.get("tie_word_embeddings", True),
        ),
        "HF mamba",
    )


def _config_from_hf_mamba2(raw: dict[str, Any]) -> MambaLMConfig:
    _check_silu(raw, "mamba2")
    d_model = _require(raw, "hidden_size", "mamba2")
    expand = raw.get("expand", 2)
    num_heads, head_dim = _require(raw, "num_heads", "mamba2"), raw.get("head_dim", 64)
    if num_heads * head_dim != expand * d_model:
        raise CheckpointError(
            f"config.json of a HF mamba2 checkpoint: num_heads * head_dim ({num_heads} * {head_dim}) must equal "
            f"expand * hidden_size ({expand} * {d_model})"
        )
    eps = raw.get("layer_norm_epsilon", 1e-5)
    ssm_cfg = dict(
        layer="Mamba2",
        d_state=raw.get("state_size", 128),
        d_conv=raw.get("conv_kernel", 4),
        expand=expand,
        headdim=head_dim,
        ngroups=raw.get("n_groups", 8),
        chunk_size=raw.get("chunk_size", 256),
        # A list, as JSON gives it back: configs then compare equal after a save and load.
        dt_limit=list(raw.get("time_step_limit", (0.0, math.inf))),
        # HF's gated norm multiplies by silu(z) before normalising, in groups of d_inner / ngroups.
        norm_before_gate=raw.get("norm_before_gate", False),
        norm_eps=eps,
        bias=raw.get("use_bias", False),
        conv_bias=raw.get("use_conv_bias", True),
    )
    return _checked_config(
        dict(
            _hf_common(raw, "mamba2"),
            ssm_cfg=ssm_cfg,
            norm_epsilon=eps,
            residual_in_fp32=raw.get("residual_in_fp32", True),
            tie_embeddings=raw.get("tie_word_embeddings", False),
        ),
        "HF mamba2",
    )


def _config_from_hf_llama(raw: dict[str, Any]) -> MambaLMConfig:
    _check_silu(raw, "llama")
    d_model = _require(raw, "hidden_size", "llama")
    num_heads = _require(raw, "num_attention_heads", "llama")
    head_dim = raw.get("head_dim") or d_model // num_heads
    if raw.get("mlp_bias", False):
        raise CheckpointError("config.json of a HF llama checkpoint has mlp_bias=true; our gated MLP has no biases")
    # transformers < 5 writes rope_theta + rope_scaling, >= 5 rope_parameters {rope_type, rope_theta}.
    rope = raw.get("rope_parameters") or {}
    if raw.get("rope_scaling") is not None or rope.get("rope_type", "default") != "default":
        scaling = raw.get("rope_scaling") or rope
        raise CheckpointError(
            f"config.json of a HF llama checkpoint asks for RoPE scaling {scaling!r}; only plain RoPE "
            "(rope_scaling null, rope_type 'default') is supported"
        )
    bias = raw.get("attention_bias", False)
    attn_cfg = dict(
        num_heads=num_heads,
        num_heads_kv=raw.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        # HF Llama rotates every channel of a head, pairing channel j with j + head_dim / 2.
        rotary_emb_dim=head_dim,
        rotary_emb_base=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        rotary_emb_interleaved=False,
        qkv_proj_bias=bias,
        out_proj_bias=bias,
    )
    return _checked_config(
        dict(
            _hf_common(raw, "llama"),
            d_intermediate=_require(raw, "intermediate_size", "llama"),
            layer_pattern="A",
            attn_cfg=attn_cfg,
            norm_epsilon=raw.get("rms_norm_eps", 1e-6),
            # HF Llama adds its residual in the model dtype.
            residual_in_fp32=False,
            tie_embeddings=raw.get("tie_word_embeddings", False),
        ),
        "HF llama",
    )


_HF_CONVERTERS = {"mamba": _config_from_hf_mamba, "mamba2": _config_from_hf_mamba2, "llama": _config_from_hf_llama}
_CONFIG_CONVERTERS = {MODEL_TYPE: _config_from_ours, "mamba_ssm": _config_from_mamba_ssm, **_HF_CONVERTERS}


# --------------------------------------------------------------------------- Llama weights

_LLAMA_TOP = {"model.embed_tokens.weight": EMBEDDING_KEY, "model.norm.weight": "backbone.norm_f.weight"}
_LLAMA_LAYER = {
    "input_layernorm.weight": "norm.weight",
    "post_attention_layernorm.weight": "norm2.weight",
    "self_attn.o_proj.weight": "mixer.out_proj.weight",
    "self_attn.o_proj.bias": "mixer.out_proj.bias",
    "mlp.down_proj.weight": "mlp.fc2.weight",
}
# Our key <- HF keys, concatenated along the output rows in this order.
_LLAMA_CONCAT = {
    "mixer.in_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mixer.in_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    # GatedMLP computes value * silu(gate) with fc1 rows [value; gate]: Llama's up is the value.
    "mlp.fc1.weight": ("mlp.up_proj.weight", "mlp.gate_proj.weight"),
}
_LLAMA_PART_OF = {part: (ours, i) for ours, parts in _LLAMA_CONCAT.items() for i, part in enumerate(parts)}
_LLAMA_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# GatedMLP's default multiple_of, which MambaLM keeps: its hidden size is d_intermediate rounded up to this.
_MLP_MULTIPLE_OF = 128


def _llama_state(state: dict[str, torch.Tensor], d_intermediate: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, t in state.items():
        match = _LLAMA_LAYER_KEY.fullmatch(key)
        if key in _LLAMA_TOP:
            out[_LLAMA_TOP[key]] = t
        elif match is None:
            out[key] = t  # lm_head.weight, or a stray key that the strict check reports
        elif match.group(2) == "self_attn.rotary_emb.inv_freq":
            continue  # older transformers saved this buffer; it follows from rope_theta
        elif match.group(2) in _LLAMA_LAYER:
            out[f"backbone.layers.{match.group(1)}.{_LLAMA_LAYER[match.group(2)]}"] = t
        elif match.group(2) in _LLAMA_PART_OF:
            ours, i = _LLAMA_PART_OF[match.group(2)]
            groups.setdefault((match.group(1), ours), {})[i] = t
        else:
            out[key] = t
    incomplete = []
    for (layer, ours), parts in groups.items():
        names = _LLAMA_CONCAT[ours]
        if len(parts) != len(names):
            incomplete += [f"model.layers.{layer}.{names[i]}" for i in range(len(names)) if i not in parts]
            continue
        if ours == "mlp.fc1.weight":
            parts = {i: _pad_rows(t, d_intermediate) for i, t in parts.items()}
        out[f"backbone.layers.{layer}.{ours}"] = torch.cat([parts[i] for i in range(len(names))], dim=0)
    if incomplete:
        raise CheckpointError(f"the HF llama checkpoint lacks {sorted(incomplete)} (its other parts are present)")
    for key in [k for k in out if k.endswith(".mlp.fc2.weight")]:
        out[key] = _pad_rows(out[key].t(), d_intermediate).t().contiguous()
    return out


def _pad_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """Zero rows appended up to GatedMLP's rounded hidden size.

    Exact: a zero value row and a zero gate row give 0 * silu(0) = 0, which the
    zero columns of fc2 then ignore. Rows beyond ``hidden`` are left for the
    shape check to report.
    """
    rounded = -(-hidden // _MLP_MULTIPLE_OF) * _MLP_MULTIPLE_OF
    if t.shape[0] != hidden or rounded == hidden:
        return t
    return torch.cat([t, t.new_zeros(rounded - hidden, *t.shape[1:])], dim=0)
