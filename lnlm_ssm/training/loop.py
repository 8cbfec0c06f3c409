"""``train(config)``: the training loop, in one process or in each process of ``torchrun``.

A run directory (``config.out``) ends up holding::

    data/                  the tokenised corpus (prepared once, reused on resume)
    metrics.jsonl          one row per logged step and per evaluation (training/metrics.py)
    loss.png               train and held-out loss curves
    tensorboard/           with report_to="tensorboard": metrics.jsonl's scalars as TensorBoard events
    checkpoints/           step-{N:08d}.pt training checkpoints, the newest keep_last
    model/                 the final model: config.json + model.safetensors (lnlm_ssm.from_pretrained), the
                           tokenizer, and a model card (README.md) naming the data, tokens, final evaluation, command

A step draws ``batch_size`` sequences (the global batch; each rank takes its
slice), splits its slice into ``grad_accum`` micro-batches, asks the objective
(``config.objective``, see ``lnlm_ssm.objectives``) for each one's loss, and
takes one AdamW step with the learning rate of ``lr_at``. Evaluation reports
the objective's own metrics of the held-out loss, and ``eval_<name>``, the mean of
each metric the objective returns (``eval_accuracy``, the DPO rewards). A resumed
run restores the weights, the optimizer, the data sampler and the random
generators, so it computes the same steps an uninterrupted run would have.

A fine-tuning objective (``objectives.FinetuneObjective``: classify, token-classify,
sft, reward, dpo) starts from ``config.init_from`` (with a new head where the
objective needs one) instead of a preset, and reads JSONL rows (``data.finetune``)
from ``config.data`` and ``config.eval_data`` (no evaluation without it) instead of
a corpus; ``seq_len`` is then the most tokens a row keeps. Its model/ holds the
tokenizer of --init-from's directory where it has one. The seq2seq objective may
start from ``config.init_from`` too (a Seq2SeqLM checkpoint, trained as it is),
with that tokenizer, and reads its own text-to-text rows either way.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import random
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils.checkpoint import checkpoint

from lnlm_ssm.data.corpus import default_corpus_dir, prepare_corpus
from lnlm_ssm.data.sampler import WindowSampler
from lnlm_ssm.data.finetune import Encoder, RowSampler, label_ids, read_rows
from lnlm_ssm.data.tokenizers import BUILTIN_TOKENIZERS, TOKENIZER_KIND_FILE, load_tokenizer, save_tokenizer_kind
from lnlm_ssm.layers.base import declared_parameter_names
from lnlm_ssm.models import CheckpointError, ConfigError, architectures, from_pretrained, preset, preset_architecture
from lnlm_ssm.models.seq2seq import Seq2SeqLM
from lnlm_ssm.objectives import OBJECTIVES, FinetuneObjective, ObjectiveOutput, get_objective
from lnlm_ssm.training import distributed as dist_lib
from lnlm_ssm.training.parallel import Layout
from lnlm_ssm.training.parallel.pipeline import Pipeline
from lnlm_ssm.training.parallel.tensor import tensor_parallel
from lnlm_ssm.training.state import (
    TrainCheckpointError,
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from lnlm_ssm.training.config import TrainConfig, TrainConfigError
from lnlm_ssm.training.metrics import (
    MetricsLog,
    ProgressBar,
    TensorBoardLog,
    plot_losses,
    read_metrics,
    require_tensorboard,
)

__all__ = ["lr_at", "param_groups", "train"]

# Settings that fix what the data sampler's saved state means: a resumed run must keep them.
_DATA_FIELDS = ("data", "tokenizer", "max_bytes", "seq_len", "batch_size")


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of step ``step`` (0-based): linear warmup to ``lr``, then cosine decay to ``min_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of parameter *names*: decay on matrices only; never on vectors or declared exemptions.

    Vectors are biases, norms, D and dt biases; the exemptions are what the
    modules list in ``no_weight_decay`` (Mamba's A_log is a matrix, but decay
    would pull every state's decay rate toward one value). Names, not tensors:
    wrapping (FSDP) replaces the tensors, and the optimizer is made after it.
    """
    exempt = declared_parameter_names(model, "no_weight_decay")
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # a tied lm_head is the embedding's tensor and comes once
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name in exempt else decay).append(name)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config`` to ``config.steps`` steps; returns the final metrics.

    The result holds ``step``, ``loss`` (the last step's), the final held-out
    evaluation (``eval_loss`` and ``eval_bpb``, or a fine-tuning objective's
    ``eval_*``; none without eval data), ``tokens`` (seen in the whole run; real
    tokens when fine-tuning), ``tokens_per_s`` and ``elapsed_s`` (this process's
    share of the run), and the paths ``run_dir``, ``model_dir`` and ``checkpoint``.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig; got {type(config).__name__}")
    info = dist_lib.setup()
    try:
        return _Run(config, info).run()
    finally:
        dist_lib.cleanup(info)


class _Run:
    def __init__(self, config: TrainConfig, info: dist_lib.DistInfo) -> None:
        if config.device is not None:
            info = dataclasses.replace(info, device=torch.device(config.device))
        # The data-parallel ranks: those that each take a slice of the batch (the others split the model).
        model_ranks = config.tensor_parallel * config.pipeline_parallel
        data_ranks, rest = divmod(info.world_size, model_ranks)
        if rest:
            raise TrainConfigError(
                f"the number of processes ({info.world_size}) must be a multiple of tensor_parallel x "
                f"pipeline_parallel ({config.tensor_parallel} x {config.pipeline_parallel})"
            )
        if data_ranks > 1 and config.distributed == "none":
            raise TrainConfigError(
                f"running in {info.world_size} processes with distributed='none' would train {data_ranks} "
                "separate models: pass --distributed ddp or fsdp"
            )
        local_batch, rest = divmod(config.batch_size, data_ranks * config.grad_accum)
        if rest or not local_batch:
            raise TrainConfigError(
                f"batch_size ({config.batch_size}) must be a multiple of data-parallel ranks x grad_accum "
                f"({data_ranks} x {config.grad_accum}): every micro-batch has the same size"
            )
        if config.pipeline_parallel > 1 and local_batch % config.microbatches:
            raise TrainConfigError(
                f"microbatches ({config.microbatches}) must divide the batch of each data-parallel rank "
                f"({config.batch_size} / {data_ranks} = {local_batch})"
            )
        self.config, self.info = config, info
        self.main = dist_lib.is_main(info)
        self.device = info.device
        self.out = Path(config.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.resume_from = self._resume_path()
        if config.report_to == "tensorboard":
            require_tensorboard()  # on every rank, before any work: not an error an hour into the run
        self.plot_noted = False

    def _resume_path(self) -> Optional[Path]:
        path = latest_checkpoint(self.ckpt_dir)
        if self.config.resume and path is None:
            raise TrainCheckpointError(f"nothing to resume: no checkpoint in {self.ckpt_dir}")
        if not self.config.resume and path is not None:
            raise TrainCheckpointError(
                f"{self.out} already holds checkpoints of a run (newest: {path.name}): pass --resume to continue "
                "it, or choose another --out"
            )
        return path

    # -- setup ---------------------------------------------------------------------------------

    def _corpus(self):
        config = self.config
        source = config.data if config.data is not None else default_corpus_dir()
        # Rank 0 tokenises while the others wait at the barrier; then they find its files and reuse them.
        if not self.main:
            dist_lib.barrier(self.info)
        corpus = prepare_corpus(
            source, self.out / "data", tokenizer=config.tokenizer, max_bytes=config.max_bytes
        )
        if self.main:
            dist_lib.barrier(self.info)
        return corpus

    def _finetune_setup(self) -> tuple[nn.Module, dict[str, RowSampler]]:
        """The pretrained model a fine-tuning objective trains (with the head it needs: labels from a classifier
        checkpoint, else from the training rows) and the samplers of the JSONL rows ("val": eval_data's)."""
        config, objective, info = self.config, self.objective, self.info
        fmt = objective.data_format
        rows = read_rows(config.data, fmt)
        pretrained, label2id = self._pretrained(rows)
        tokenizer = self._finetune_tokenizer(pretrained)
        # An encoder reads a text as [CLS] text [SEP]; pairs (a reward model's) are scored as they are.
        framed = getattr(pretrained, "framed", False) and fmt in ("classify", "token")
        encoder = Encoder(tokenizer, fmt, config.seq_len, label2id, frame=framed)
        kwargs = dict(batch_size=config.batch_size, seed=config.seed, rank=info.rank, world_size=info.world_size)
        samplers = {"train": RowSampler(config.data, encoder, rows=rows, **kwargs)}
        if config.eval_data is not None:
            samplers["val"] = RowSampler(config.eval_data, encoder, **kwargs)
        if objective.needs_reference:
            reference = pretrained if config.ref_model is None else from_pretrained(config.ref_model, dtype=torch.float32)
            # A copy: the model trained is built from pretrained's weights, and the reference never moves.
            reference = copy.deepcopy(reference).to(self.device).eval().requires_grad_(False)
            objective.reference = reference
        return pretrained, samplers

    def _pretrained(self, rows: Optional[list] = None) -> tuple[nn.Module, Optional[dict[str, int]]]:
        """The model of --init-from, of the objective's family, and its labels (None without a label head).

        A checkpoint of that family is trained as it is (a classifier keeps its labels); another gets the new
        head a fine-tuning objective needs (its labels from the training ``rows``).
        """
        config, objective = self.config, self.objective
        fmt = getattr(objective, "data_format", None)
        model_class = architectures()[objective.architectures[0]].model_class
        try:
            pretrained = from_pretrained(config.init_from, dtype=torch.float32)
            ready = isinstance(pretrained, model_class)
            label2id = None
            if fmt in ("classify", "token"):
                label2id = pretrained.config.label2id if ready else label_ids(rows, fmt)
            new_head = objective.head_arguments(label2id) if isinstance(objective, FinetuneObjective) else {}
            if config.model and (ready or not new_head):
                raise TrainConfigError(
                    f"--model sets fields of a new head (pooling, ...) in fine-tuning; the objective "
                    f"{objective.name!r} puts none on {config.init_from}"
                )
            if not ready:
                head = {**new_head, **config.model}
                pretrained = model_class.from_pretrained(config.init_from, dtype=torch.float32, **head)
        except (CheckpointError, ConfigError, TypeError) as exc:
            raise TrainConfigError(f"--init-from {config.init_from}: {exc}") from None
        return pretrained, label2id

    def _finetune_tokenizer(self, pretrained: nn.Module):
        """The tokenizer of --init-from's directory where it holds one, else --tokenizer's, checked against
        ``pretrained``; ``self.tokenizer_files``: the files that name it, which the exported model gets."""
        init = Path(self.config.init_from)
        self.tokenizer_files = [init / n for n in (TOKENIZER_KIND_FILE, "tokenizer.json") if (init / n).is_file()]
        if self.tokenizer_files:
            tokenizer = load_tokenizer(init)
        else:
            name = self.config.tokenizer
            tokenizer = BUILTIN_TOKENIZERS[name]() if name in BUILTIN_TOKENIZERS else load_tokenizer(name)
        vocab = pretrained.config.vocab_size
        # Text encodes to the first text_vocab_size ids (a model from before the encoder specials has those).
        if getattr(tokenizer, "text_vocab_size", tokenizer.vocab_size) > vocab:
            raise TrainConfigError(
                f"the tokenizer has {tokenizer.vocab_size} tokens and the model of --init-from only {vocab}"
            )
        # An encoder-decoder stops generating at its config's eos: the rows must end with that one.
        if isinstance(pretrained, Seq2SeqLM) and tokenizer.eos_token_id != pretrained.config.eos_token_id:
            raise TrainConfigError(
                f"the tokenizer's eos token is {tokenizer.eos_token_id} and the model of --init-from ends its "
                f"output with eos_token_id {pretrained.config.eos_token_id}: give the tokenizer it was trained "
                "with (--tokenizer)"
            )
        return tokenizer

    def _model_class(self) -> type:
        """The preset's model class, which must be one the objective trains."""
        architecture = preset_architecture(self.config.preset)
        wanted = self.objective.architectures
        if architecture.name not in wanted:
            raise TrainConfigError(
                f"the objective {self.objective.name!r} trains {' or '.join(wanted)} models; "
                f"the preset {self.config.preset!r} is a {architecture.name}: choose a preset of one of those"
            )
        return architecture.model_class

    def _model_config(self, vocab_size: int):
        """The config of the preset's model (any family), with the tokenizer's vocab plus the objective's
        ``extra_ids`` (span corruption's sentinels) and the --model overrides."""
        extra = self.objective.extra_ids
        try:
            model_config = preset(self.config.preset, **{"vocab_size": vocab_size + extra, **self.config.model})
        except ConfigError as exc:
            raise TrainConfigError(f"--model: {exc}") from None
        if model_config.vocab_size < vocab_size + extra:
            with_extra = f" plus the {extra} extra ids of the objective {self.objective.name!r}" if extra else ""
            raise TrainConfigError(
                f"model vocab_size {model_config.vocab_size} is smaller than the tokenizer's {vocab_size}{with_extra}"
            )
        return model_config

    def _check_resumable(self, state: dict[str, Any], model_config) -> None:
        path = self.resume_from
        if state["step"] >= self.config.steps:
            raise TrainConfigError(
                f"{path} is at step {state['step']} and the run asks for {self.config.steps} steps: give a larger "
                "--steps to train further"
            )
        if state["model_config"] != model_config.to_dict():
            saved = state["model_config"]
            now = model_config.to_dict()
            keys = sorted(set(saved) | set(now))
            differ = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
            raise TrainCheckpointError(
                f"cannot resume from {path}: it holds a different model; fields (checkpoint, this run): {differ}"
            )
        # Checkpoints from before objectives were all causal LM runs.
        saved_objective = state.get("objective", "clm")
        if saved_objective != self.config.objective:
            raise TrainCheckpointError(
                f"cannot resume from {path}: it was trained with the objective {saved_objective!r} and this run "
                f"asks for {self.config.objective!r}"
            )
        differ = {k: (state["config"].get(k), getattr(self.config, k)) for k in _DATA_FIELDS}
        differ = {k: v for k, v in differ.items() if v[0] != v[1]}
        if differ:
            raise TrainCheckpointError(
                f"cannot resume from {path} with different data settings; fields (checkpoint, this run): {differ}"
            )

    def _build_model(self, model_config, pretrained: Optional[nn.Module] = None) -> nn.Module:
        """The model (with ``pretrained``'s weights, if given), wrapped for data parallelism; sets
        ``self.optimizer`` and ``self.autocast``."""
        model = self.model_class(model_config, backend=self.config.backend)
        if pretrained is not None:
            model.load_state_dict(pretrained.state_dict())
        if self.config.activation_checkpointing:
            blocks = getattr(getattr(model, "backbone", None), "layers", None)
            if blocks is None:
                raise TrainConfigError(
                    f"activation_checkpointing needs a model with backbone.layers; a {type(model).__name__} has none"
                )
            for block in blocks:
                # An instance attribute, so state-dict keys and the FSDP wrapping of blocks stay as they are.
                block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        self.layout = Layout.of(self.info, tensor=self.config.tensor_parallel, pipeline=self.config.pipeline_parallel)
        self.pipeline = None
        if self.layout.tensor > 1:
            tensor_parallel(
                model.to(self.device), self.layout.mesh["tp"], sequence_parallel=self.config.sequence_parallel
            )
        if self.layout.pipeline > 1:
            self.pipeline = Pipeline(model.to(self.device), self.layout, self.device)
            model = self.pipeline.module
        groups = param_groups(model, self.config.weight_decay)
        data_mesh = None if self.layout.mesh is None else self.layout.mesh["dp"]
        wrapped = dist_lib.wrap_model(model, self.config.distributed, self.info, mesh=data_mesh)
        if self.pipeline is not None:
            self.pipeline.attach(wrapped, self.config.microbatches, self.config.pp_schedule)
        params = dict(model.named_parameters())
        for group in groups:
            group["params"] = [params[name] for name in group["params"]]
        config = self.config
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        if config.dtype == "auto":
            use_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        else:
            use_bf16 = config.dtype == "bf16"
        # Weights and optimizer state stay fp32; matmuls (and the kernels that take it) run in bf16.
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16, enabled=use_bf16)
        return wrapped

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        config, info = self.config, self.info
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        options = getattr(OBJECTIVES[config.objective], "options", {})
        self.objective = get_objective(config.objective, **{arg: getattr(config, f) for arg, f in options.items()})
        self.finetune = isinstance(self.objective, FinetuneObjective)
        pretrained = None
        if self.finetune:
            pretrained, samplers = self._finetune_setup()
            model_config, bytes_per_token = pretrained.config, math.nan
            self.model_class = type(pretrained)
        elif config.init_from is not None:  # seq2seq: text-to-text rows from a checkpoint rather than a preset
            pretrained, _ = self._pretrained()
            self.objective.use_tokenizer(self._finetune_tokenizer(pretrained))
            model_config, bytes_per_token = pretrained.config, math.nan
            self.model_class = type(pretrained)
        else:
            self.model_class = self._model_class()
            corpus = self._corpus()
            self.objective.use_tokenizer(corpus.load_tokenizer())
            model_config = self._model_config(corpus.vocab_size)
            bytes_per_token = corpus.bytes_per_token("val")
        state = None
        if self.resume_from is not None:
            state = load_checkpoint(self.resume_from)
            self._check_resumable(state, model_config)
        model = self._build_model(model_config, pretrained)
        if not self.finetune:
            # Each data-parallel replica draws its own slice; the ranks of one replica (TP, PP) draw the same.
            sampling = dict(
                seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed, rank=self.layout.dp_rank,
                world_size=self.layout.data,
            )
            samplers = self.objective.samplers(config.data, **sampling) or {
                split: WindowSampler(corpus, split, **sampling) for split in ("train", "val")
            }
        step = tokens = 0
        if state is not None:
            # Rank 0's dicts are broadcast; the other ranks pass empty ones (full ones break DDP's load there).
            if self.pipeline is not None:  # every stage takes its part of the dicts it read itself
                self.pipeline.load_full_state_dicts(model, self.optimizer, state["model"], state["optimizer"])
            else:
                model_sd, optim_sd = (state["model"], state["optimizer"]) if self.main else ({}, {})
                dist_lib.load_full_state_dicts(model, self.optimizer, model_sd, optim_sd, info)
            samplers["train"].load_state_dict(state["sampler"])
            restore_rng(state["rng"])
            step, tokens = state["step"], state["progress"]["tokens"]
        first_step, first_tokens = step, tokens
        tokens_per_step = config.batch_size * config.seq_len

        resume_step = None if state is None else step
        log = MetricsLog(self.out / "metrics.jsonl", resume_step=resume_step) if self.main else None
        board = (
            TensorBoardLog(self.out / "tensorboard", resume_step=resume_step)
            if self.main and config.report_to == "tensorboard"
            else None
        )
        bar = ProgressBar(config.steps, initial=step) if self.main else None
        if bar is not None and state is not None:
            bar.message(f"resuming from {self.resume_from} at step {step}")
        result: dict[str, Any] = {}
        final_eval: dict[str, float] = {}
        saved = self.resume_from
        start = last_log_time = time.perf_counter()
        last_log_tokens = tokens
        try:
            while step < config.steps:
                lr = lr_at(step, config)
                batch = samplers["train"].next_batch()
                # Fine-tuning batches count their real tokens (this rank's, times the ranks).
                step_tokens = batch.num_tokens * info.world_size if self.finetune else tokens_per_step
                loss, grad_norm, step_metrics = self._step(model, batch, lr)
                step += 1
                tokens += step_tokens
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"the training loss is {loss} at step {step}: lower --lr (now {config.lr}) or --grad-clip"
                    )
                result["loss"] = loss
                last = step == config.steps
                now = time.perf_counter()
                if step % config.log_every == 0 or last:
                    tokens_per_s = (tokens - last_log_tokens) / (now - last_log_time)
                    last_log_tokens, last_log_time = tokens, now
                    scalars = dict(loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s, **step_metrics)
                    if log is not None:
                        log.write("train", step, **scalars, tokens=tokens, elapsed_s=now - start)
                    # Not tokens and elapsed_s: they are TensorBoard's step and wall-time axes.
                    if board is not None:
                        board.write("train", step, **scalars)
                if bar is not None:
                    speed = (tokens - first_tokens) / (now - start)
                    bar.update(step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", speed=f"{_si(speed)} tok/s")
                paused = time.perf_counter()  # evaluation and checkpoints do not count in tokens_per_s
                if (step % config.eval_every == 0 or last) and "val" in samplers:
                    eval_loss, eval_means = self._evaluate(model, samplers["val"])
                    metrics = self.objective.eval_metrics(eval_loss, bytes_per_token, eval_means)
                    result.update(metrics)
                    final_eval = metrics
                    if log is not None:
                        log.write("eval", step, **metrics)
                        if board is not None:
                            board.write("eval", step, **metrics)
                        bar.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if step % config.ckpt_every == 0 or last:
                    saved = self._save(model, samplers["train"], model_config, step, tokens)
                    if log is not None:
                        self._plot(log, step)
                last_log_time += time.perf_counter() - paused
            model_dir = self._export(model, model_config, self._card(step, tokens, final_eval, first_step))
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
            if board is not None:
                board.close()
        elapsed = time.perf_counter() - start
        return {
            **result,
            "step": step,
            "tokens": tokens,
            "elapsed_s": elapsed,
            "tokens_per_s": (tokens - first_tokens) / elapsed,
            "run_dir": str(self.out),
            "model_dir": str(model_dir),
            "checkpoint": str(saved),
        }

    def _step(self, model: nn.Module, batch, lr: float) -> tuple[float, float, dict[str, float]]:
        """One optimizer step on this rank's ``batch``; returns (loss, gradient norm, the objective's metrics),
        averaged over ranks (and micro-batches)."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.pipeline is not None:
            with self.autocast():
                loss = self.pipeline.step(batch.to(self.device))
            grad_norm = self.pipeline.clip_grad_norm_(model, config.grad_clip or math.inf)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return dist_lib.all_reduce_mean(loss, self.info).item(), grad_norm.item(), {}
        micro_batches = batch.to(self.device).chunk(config.grad_accum)
        total = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        for i, micro in enumerate(micro_batches):
            with self._grad_sync(model, i == len(micro_batches) - 1), self._loss_parallel():
                with self.autocast():
                    out = self.objective(model, micro)
                loss = out.loss
                # Micro-batches have equal token counts, so the mean of their means is the batch mean.
                (loss / config.grad_accum).backward()
            total += loss.detach()
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
        # max_norm=inf measures the norm without clipping, for the log.
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        mean_loss = dist_lib.all_reduce_mean(total / config.grad_accum, self.info)
        metrics = {k: dist_lib.all_reduce_mean(v / config.grad_accum, self.info).item() for k, v in sums.items()}
        return mean_loss.item(), grad_norm.item(), metrics

    def _loss_parallel(self):
        """Tensor parallelism: the loss of the logits sharded by vocabulary is loss_parallel's, forward and backward."""
        return loss_parallel() if self.layout.tensor > 1 else contextlib.nullcontext()

    @staticmethod
    def _grad_sync(model: nn.Module, sync: bool):
        """DDP: skip the gradient all-reduce of every micro-batch but the last (the last one's covers them)."""
        if not sync and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    @torch.no_grad()
    def _evaluate(self, model: nn.Module, val) -> tuple[float, dict[str, float]]:
        """The mean held-out loss, and the mean of each metric the objective returns (both over ranks)."""
        model.eval()
        try:
            rows = []
            for batch in val.eval_batches(self.config.eval_batches):
                with self.autocast():
                    if self.pipeline is not None:  # the clm objective (TrainConfig): a loss, no other metric
                        out = ObjectiveOutput(loss=self.pipeline.eval_loss(batch.to(self.device)))
                    else:
                        with self._loss_parallel():
                            out = self.objective(model, batch.to(self.device))
                rows.append(torch.stack([out.loss.float(), *(v.float() for v in out.metrics.values())]))
            means = dist_lib.all_reduce_mean(torch.stack(rows).mean(dim=0), self.info).tolist()
            return means[0], dict(zip(out.metrics, means[1:]))
        finally:
            model.train()

    def _full_state_dicts(self, model: nn.Module, optimizer):
        if self.pipeline is not None:
            return self.pipeline.full_state_dicts(model, optimizer)
        return dist_lib.full_state_dicts(model, optimizer, self.info)

    def _save(self, model, sampler, model_config, step: int, tokens: int) -> Path:
        model_sd, optim_sd = self._full_state_dicts(model, self.optimizer)
        if self.main:
            # RNG states are rank 0's: the loop draws nothing random outside the sampler, whose state is global.
            save_checkpoint(
                self.ckpt_dir,
                {
                    "step": step,
                    "model": model_sd,
                    "optimizer": optim_sd,
                    "sampler": sampler.state_dict(),
                    "rng": capture_rng(),
                    "config": self.config.to_dict(),
                    "model_config": model_config.to_dict(),
                    "progress": {"tokens": tokens},
                    "objective": self.objective.name,
                },
                keep_last=self.config.keep_last,
            )
        dist_lib.barrier(self.info)
        return checkpoint_path(self.ckpt_dir, step)

    def _plot(self, log: MetricsLog, step: int) -> None:
        why_not = plot_losses(read_metrics(log.path), self.out / "loss.png")
        if why_not and not self.plot_noted:
            self.plot_noted = True
            log.write("note", step, note=why_not)

    def _card(self, step: int, tokens: int, final_eval: dict[str, float], first_step: int) -> dict[str, Any]:
        """What the exported model's card says of the run that made it (see checkpoint.save)."""
        config = self.config
        if config.data is None:
            data = f"the Python standard library's source, {_code(str(default_corpus_dir()))} (the default corpus)"
        else:
            data = _code(str(Path(config.data).resolve()))
        if config.max_bytes is not None:
            data += f", its first {config.max_bytes:,} bytes"
        if config.init_from is not None and self.tokenizer_files:
            # The model was trained with, and is exported with, --init-from's tokenizer, not --tokenizer.
            tokenizer = f"{_code(str(Path(config.init_from).resolve()))}'s (--init-from)"
        elif config.tokenizer in BUILTIN_TOKENIZERS:
            tokenizer = _code(config.tokenizer)
        else:
            tokenizer = _code(str(Path(config.tokenizer).resolve()))
        # A resumed run's command is only the last of the commands that made the weights.
        command = f"command (resuming at step {first_step})" if first_step else "command"
        return {
            "data": data,
            "tokenizer": tokenizer,
            "objective": _code(self.objective.name),
            "steps": step,
            "tokens seen": tokens,
            **{f"final {name}": value for name, value in final_eval.items()},
            command: _code(shlex.join(sys.argv)),
        }

    def _export(self, model: nn.Module, model_config, card: dict[str, Any]) -> Path:
        """The final weights as a checkpoint of the preset's family in out/model, with the tokenizer it was
        trained with and its model card."""
        model_dir = self.out / "model"
        model_sd, _ = self._full_state_dicts(model, None)
        if self.main:
            export = self.model_class(model_config)
            export.load_state_dict(model_sd)
            export.save_pretrained(model_dir, card=card)
            tokenizer = self.config.tokenizer
            if self.config.init_from is not None and self.tokenizer_files:
                for file in self.tokenizer_files:
                    shutil.copyfile(file, model_dir / file.name)
            elif tokenizer in ("byte", "amino"):
                save_tokenizer_kind(model_dir, tokenizer)
            else:
                # A tokenizer.json or a directory holding one (prepare_corpus has checked it exists).
                path = Path(tokenizer)
                shutil.copyfile(path / "tokenizer.json" if path.is_dir() else path, model_dir / "tokenizer.json")
        dist_lib.barrier(self.info)
        return model_dir


def _code(text: str) -> str:
    """``text`` as a markdown code span, fenced by more backticks than any run of them inside it."""
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"
