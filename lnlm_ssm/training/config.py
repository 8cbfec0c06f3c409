"""TrainConfig: every setting of a training run, from a TOML file and/or command-line flags.

A TOML file holds the fields at its top level and the model overrides in a
``[model]`` table::

    preset = "mamba2-tiny"
    steps = 2000
    lr = 1e-3
    [model]
    n_layer = 4

Flags given on the command line replace the file's values (``--config run.toml
--lr 3e-4``). Unknown keys and values of the wrong type are errors that name
the key. Paths (data, out, tokenizer) are relative to the working directory,
as flags are, not to the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from lnlm_ssm.models import preset_names
from lnlm_ssm.objectives import OBJECTIVES, FinetuneObjective, Objective
from lnlm_ssm.ops._backends import BACKENDS
from lnlm_ssm.training.distributed import MODES
from lnlm_ssm.training.parallel.pipeline import SCHEDULES
from lnlm_ssm.utils.checks import check_choice

__all__ = ["TrainConfig", "TrainConfigError", "add_arguments", "config_from_args"]

DTYPES = ("auto", "fp32", "bf16")
REPORT_TO = ("none", "tensorboard")
# The fields whose value is one of a fixed set of names, and the set.
CHOICES = {
    "dtype": DTYPES,
    "distributed": MODES,
    "backend": ("auto",) + BACKENDS,
    "objective": tuple(OBJECTIVES),
    "preset": tuple(preset_names()),
    "report_to": REPORT_TO,
    "pp_schedule": tuple(SCHEDULES),
}


class TrainConfigError(ValueError):
    """A training setting that is missing, unknown or out of range."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """The settings of one training run; the defaults train mamba-tiny on the stdlib corpus on a laptop CPU.

    ``batch_size`` is the global batch (sequences per optimizer step, summed over
    ranks and accumulation micro-steps), so changing ``grad_accum`` or the number
    of processes does not change what a step computes.
    """

    preset: str = field(default="mamba-tiny", metadata=_help("model preset, of any family (lnlm_ssm.models.preset_names())"))
    objective: str = field(default="clm", metadata=_help("training objective (lnlm_ssm.objectives.OBJECTIVES)"))
    model: dict[str, Any] = field(
        default_factory=dict, metadata=_help("model config fields that replace the preset's")
    )
    data: Optional[str] = field(
        default=None, metadata=_help("a text file or directory (default: the Python stdlib corpus)")
    )
    tokenizer: str = field(default="byte", metadata=_help('"byte", "amino", or a tokenizer.json path'))
    out: str = field(default="runs/train", metadata=_help("run directory: metrics, checkpoints, final model"))
    steps: int = field(default=1000, metadata=_help("optimizer steps in the whole run"))
    batch_size: int = field(default=16, metadata=_help("global batch in sequences per optimizer step"))
    seq_len: int = field(default=128, metadata=_help("tokens per training sequence"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step (same global batch)"))
    lr: Optional[float] = field(
        default=None,
        metadata=_help(f"peak learning rate (default: the objective's default_lr: {Objective.default_lr:g} for "
                       f"pre-training, {FinetuneObjective.default_lr:g} for fine-tuning)"),
    )
    min_lr: Optional[float] = field(
        default=None, metadata=_help("learning rate at the end of the cosine decay (default: lr / 10)")
    )
    warmup_steps: int = field(default=10, metadata=_help("steps of linear warmup to lr"))
    weight_decay: float = field(default=0.1, metadata=_help("AdamW decoupled weight decay on matrices"))
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata=_help("AdamW betas"))
    grad_clip: float = field(default=1.0, metadata=_help("clip the global gradient norm to this (0: off)"))
    eval_every: int = field(default=20, metadata=_help("steps between held-out evaluations (and at the end)"))
    eval_batches: int = field(default=4, metadata=_help("held-out batches per evaluation"))
    log_every: int = field(default=1, metadata=_help("steps between rows of metrics.jsonl"))
    report_to: str = field(
        default="none",
        metadata=_help("also log metrics.jsonl's scalars to: none, tensorboard (event files in out/tensorboard; needs "
                       "pip install lnlm_ssm[tensorboard])"),
    )
    ckpt_every: int = field(default=50, metadata=_help("steps between training checkpoints (and at the end)"))
    keep_last: int = field(default=3, metadata=_help("training checkpoints to keep"))
    resume: bool = field(default=False, metadata=_help("continue from the newest checkpoint in out/checkpoints"))
    seed: int = field(default=0, metadata=_help("seed of the initialisation and of the data order"))
    dtype: str = field(
        default="auto", metadata=_help("compute dtype: auto (bf16 autocast on CUDA with bf16), fp32, bf16")
    )
    activation_checkpointing: bool = field(
        default=False, metadata=_help("recompute each block in backward instead of storing its activations")
    )
    distributed: str = field(default="none", metadata=_help("data parallelism under torchrun: none, ddp, fsdp"))
    tensor_parallel: int = field(
        default=1, metadata=_help("ranks that split each layer's heads (training.parallel.tensor)")
    )
    sequence_parallel: bool = field(
        default=False,
        metadata=_help("with tensor_parallel: split the hidden states between layers along the sequence, so that "
                       "each rank keeps and normalises its slice only"),
    )
    pipeline_parallel: int = field(
        default=1, metadata=_help("ranks that split the stack of blocks into stages (training.parallel.pipeline)")
    )
    microbatches: int = field(default=4, metadata=_help("micro-batches of each step's pipeline schedule"))
    pp_schedule: str = field(default="1f1b", metadata=_help("pipeline schedule: gpipe, 1f1b"))
    backend: str = field(default="auto", metadata=_help("op backend: auto, reference, cpu, triton, cuda"))
    max_bytes: Optional[int] = field(default=None, metadata=_help("read at most this many bytes of the corpus"))
    device: Optional[str] = field(
        default=None, metadata=_help("torch device (default: this rank's cuda device, else cpu)")
    )
    init_from: Optional[str] = field(
        default=None,
        metadata=_help("fine-tuning objectives: the checkpoint to start from (anything from_pretrained reads); "
                       "--data is then a JSONL file of rows (lnlm_ssm.data.finetune); seq2seq: a Seq2SeqLM "
                       "checkpoint to start from instead of --preset"),
    )
    eval_data: Optional[str] = field(
        default=None, metadata=_help("fine-tuning and seq2seq: a JSONL file of held-out rows")
    )
    ref_model: Optional[str] = field(
        default=None, metadata=_help("dpo: the frozen reference model (default: the --init-from weights)")
    )
    dpo_beta: float = field(default=0.1, metadata=_help("dpo: beta, the strength of the KL penalty"))
    dpo_label_smoothing: float = field(
        default=0.0, metadata=_help("dpo: the assumed share of pairs whose preference is flipped (conservative DPO)")
    )
    dpo_shared_prefix: bool = field(
        default=True,
        metadata=_help("dpo: run each pair's prompt once and continue both completions from its state (not under "
                       "fsdp, whose wrappers copy the state)"),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f, getattr(self, f.name)))
        for name, choices in CHOICES.items():
            try:
                check_choice(name, getattr(self, name), choices)
            except ValueError as exc:
                raise TrainConfigError(str(exc)) from None
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "log_every",
                    "ckpt_every", "keep_last", "tensor_parallel", "pipeline_parallel", "microbatches")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.seed < 0:
            raise TrainConfigError(f"seed must be >= 0; got {self.seed}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise TrainConfigError(f"max_bytes must be >= 1 (or absent: the whole corpus); got {self.max_bytes}")
        if self.batch_size % self.grad_accum:
            raise TrainConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum}): "
                "every micro-batch has the same number of sequences"
            )
        if self.pipeline_parallel > 1 and (self.grad_accum > 1 or self.objective != "clm"):
            raise TrainConfigError(
                f"pipeline_parallel runs the clm objective with grad_accum 1 (its micro-batches are microbatches); "
                f"got objective {self.objective!r}, grad_accum {self.grad_accum}"
            )
        if self.pipeline_parallel > 1 and self.tensor_parallel > 1:
            raise TrainConfigError("tensor_parallel and pipeline_parallel do not compose yet: give one of them")
        if self.sequence_parallel and (self.tensor_parallel == 1 or self.seq_len % self.tensor_parallel
                                       or self.objective != "clm"):
            raise TrainConfigError(
                f"sequence_parallel splits the clm objective's windows of seq_len tokens over the tensor_parallel "
                f"ranks: it needs tensor_parallel > 1 dividing seq_len and objective clm; got tensor_parallel "
                f"{self.tensor_parallel}, seq_len {self.seq_len}, objective {self.objective!r}"
            )
        if self.tensor_parallel > 1 and self.objective == "dpo":
            raise TrainConfigError(
                "the dpo objective reads the logits, which tensor_parallel shards by vocabulary: give tensor_parallel 1"
            )
        # Fine-tuning moves pretrained weights, and wants a smaller step than training from scratch.
        if self.lr is None:
            self.lr = OBJECTIVES[self.objective].default_lr
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if not self.lr > 0:
            raise TrainConfigError(f"lr must be > 0; got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise TrainConfigError(f"min_lr must be in [0, lr={self.lr}]; got {self.min_lr}")
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise TrainConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not all(0 <= b < 1 for b in self.betas):
            raise TrainConfigError(f"betas must both be in [0, 1); got {self.betas}")
        finetune = issubclass(OBJECTIVES[self.objective], FinetuneObjective)
        if finetune and (self.init_from is None or self.data is None):
            raise TrainConfigError(
                f"the objective {self.objective!r} fine-tunes a pretrained model: give --init-from (a checkpoint) "
                "and --data (a JSONL file of rows)"
            )
        if not OBJECTIVES[self.objective].takes_init_from:
            given = [n for n in ("init_from", "eval_data", "ref_model") if getattr(self, n) is not None]
            if given:
                raise TrainConfigError(
                    f"{', '.join(given)} are for the fine-tuning objectives and seq2seq, not {self.objective!r}"
                )
        if self.ref_model is not None and not getattr(OBJECTIVES[self.objective], "needs_reference", False):
            raise TrainConfigError(f"ref_model is for dpo, not {self.objective!r}")
        if not self.dpo_beta > 0:
            raise TrainConfigError(f"dpo_beta must be > 0; got {self.dpo_beta}")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            raise TrainConfigError(f"dpo_label_smoothing must be in [0, 0.5); got {self.dpo_label_smoothing}")
        if self.objective == "dpo" and self.distributed == "fsdp" and self.dpo_shared_prefix:
            raise TrainConfigError(
                "dpo under fsdp needs --no-dpo-shared-prefix: FSDP copies the state each block is given, so the "
                "completions could not continue from the prompt's"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-able values; ``TrainConfig(**config.to_dict())`` gives an equal config."""
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        if not isinstance(data, dict):
            raise TrainConfigError(f"{source} must be a table of TrainConfig fields; got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise TrainConfigError(f"{source} has unknown keys {unknown}; known keys: {known}")
        return cls(**data)

    @classmethod
    def from_toml(cls, path: Union[str, os.PathLike], **overrides: Any) -> "TrainConfig":
        """The config in the TOML file ``path``, with ``overrides`` replacing its values."""
        path = Path(path)
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise TrainConfigError(f"config file {path} is not valid TOML: {err}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"config file {path} has unknown keys {unknown}; known keys: {sorted(known)}")
        table = data.get("model", {})
        if not isinstance(table, dict):
            raise TrainConfigError(f"config file {path}: model must be a [model] table of model config fields")
        # Flags name single model fields: merge them into the file's [model] table.
        model = {**table, **overrides.pop("model", {})}
        return cls.from_dict({**data, **overrides, "model": model}, source=f"config file {path}")


def _checked(f: dataclasses.Field, value: Any) -> Any:
    """``value`` as the type of field ``f`` (int for float fields, str for paths), or a TrainConfigError."""
    name = f.name
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None and default is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    expected = type(default) if default is not None else _OPTIONAL_TYPES[name]
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is tuple:
        ok = (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        )
        value = tuple(float(v) for v in value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        what = "a pair of numbers" if expected is tuple else f"{'a table' if expected is dict else expected.__name__}"
        raise TrainConfigError(f"{name} must be {what}; got {value!r} ({type(value).__name__})")
    return dict(value) if expected is dict else value


_OPTIONAL_TYPES = {"data": str, "max_bytes": int, "device": str}
_OPTIONAL_TYPES.update(init_from=str, eval_data=str, ref_model=str, lr=float, min_lr=float)


# --------------------------------------------------------------------------- command line


def _model_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. n_layer=2); got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw  # a bare string such as layer_pattern=MMA


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--config`` and one flag per TrainConfig field (``--seq-len`` for ``seq_len``).

    Flags left out are absent from the parsed namespace (not set to a default), so
    that ``config_from_args`` can tell a flag from the TOML file's value.
    """
    parser.add_argument("--config", help="a TOML file of TrainConfig fields; flags override its values")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = f.metadata["help"] if default is None else f"{f.metadata['help']} (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": shown}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "model":
            kwargs.update(
                action="append",
                type=_model_override,
                metavar="KEY=VALUE",
                help="replace one field of the preset's model config; VALUE is JSON or a bare string "
                "(repeat the flag: --model n_layer=2 --model d_model=64)",
            )
        elif f.name == "betas":
            kwargs.update(type=float, nargs=2, metavar=("BETA1", "BETA2"))
        elif f.name in CHOICES:
            kwargs["choices"] = CHOICES[f.name]
        else:
            kwargs["type"] = _OPTIONAL_TYPES.get(f.name) or type(default)
        parser.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed flags: ``--config``'s file (if any) with the given flags on top."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "model" in given:
        given["model"] = dict(given["model"])
    if getattr(args, "config", None):
        return TrainConfig.from_toml(args.config, **given)
    return TrainConfig(**given)
