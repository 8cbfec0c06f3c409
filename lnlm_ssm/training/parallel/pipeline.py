"""Pipeline parallelism for MambaLM: the block stack cut into stages, run by ``torch.distributed.pipelining``.

The stack is split by hand, as torchtitan does: stage s holds a contiguous run
of blocks (``stage_layers``), the first stage also the embedding, the last also
the final norm and the LM head. ``PipelineStageModule`` keeps the plain model's
parameter names (``backbone.layers.{i}`` with i the block's index in the whole
stack), so a stage's state dict is a part of the plain model's. Between stages
travel ``(hidden_states, residual)``, the block's own outputs.

The schedule (``ScheduleGPipe`` or ``Schedule1F1B``) cuts each batch into
micro-batches; the loss of a step is the mean of theirs (``scale_grads``), as
one process computes it on the whole batch.

A tied embedding and head live on the first and the last stage: both start from
one value and, after each backward, each takes the sum of the two gradients,
so that AdamW moves both copies alike and they stay one value.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from lnlm_ssm.models.causal_lm import MambaLM
from lnlm_ssm.models.heads import causal_lm_loss, lm_logits

__all__ = ["SCHEDULES", "Pipeline", "PipelineStageModule", "stage_layers"]

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
# The two names of a tied embedding and head.
_EMBEDDING, _HEAD = "backbone.embedding.weight", "lm_head.weight"


def stage_layers(n_layer: int, stages: int) -> list[range]:
    """The blocks of each stage: contiguous, as even as can be, the earlier stages one more when uneven."""
    if n_layer < stages:
        raise ValueError(
            f"pipeline_parallel ({stages}) must be at most n_layer ({n_layer}): every stage holds at least one block"
        )
    size, extra = divmod(n_layer, stages)
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + size + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


class PipelineStageModule(nn.Module):
    """One stage of a ``MambaLM``: its blocks (and the embedding on the first, the norm and head on the last).

    Forward: input ids (first stage) or ``(hidden_states, residual)`` (the
    others) -> ``(hidden_states, residual)``, or the logits on the last stage.
    """

    def __init__(self, model: nn.Module, layers: range, *, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.vocab_size, self.backend = model.config.vocab_size, model.backend
        self.residual_in_fp32 = model.config.residual_in_fp32
        self.backbone = nn.Module()
        if first:
            self.backbone.embedding = model.backbone.embedding
        self.backbone.layers = nn.ModuleDict({str(i): model.backbone.layers[i] for i in layers})
        if last:
            self.backbone.norm_f = model.backbone.norm_f
            self.lm_head = model.lm_head

    def forward(self, *inputs: torch.Tensor):
        if self.first:
            (input_ids,) = inputs
            hidden_states, residual = self.backbone.embedding(input_ids), None
        else:
            hidden_states, residual = inputs
        for block in self.backbone.layers.values():
            hidden_states, residual = block(hidden_states, residual, None, None, None)
        if not self.last:
            return hidden_states, residual
        hidden_states = self.backbone.norm_f(
            hidden_states, residual=residual, prenorm=False, residual_in_fp32=self.residual_in_fp32
        )
        return lm_logits(hidden_states, self.lm_head, self.vocab_size, self.backend)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return causal_lm_loss(logits, labels)


class Pipeline:
    """This rank's stage of a MambaLM over the ``pp`` dimension of ``layout.mesh``, and its schedule.

    Every rank builds the same full ``model`` (rank 0's values are the ones
    kept); the stage takes its part, and ``module`` is what to wrap for data
    parallelism (``wrap_model(..., mesh=layout.mesh["dp"])``) and to hand
    ``attach``, which makes the schedule. ``microbatches`` must divide the
    local batch.
    """

    def __init__(self, model: nn.Module, layout, device: torch.device) -> None:
        if not isinstance(model, MambaLM):
            raise TypeError(f"pipeline parallelism splits MambaLM models; got a {type(model).__name__}")
        self.layout, self.device = layout, device
        stages, stage = layout.pipeline, layout.pp_rank
        layers = stage_layers(model.config.n_layer, stages)[stage]
        self.first, self.last = stage == 0, stage == stages - 1
        # Ranks seeded differently would start from a patchwork of models: every stage takes rank 0's.
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)
        self.module = PipelineStageModule(model, layers, first=self.first, last=self.last)
        self.tied = model.config.tie_embeddings
        self.group = layout.mesh["pp"].get_group()
        if layout.tensor > 1:
            raise ValueError("pipeline stages are not split by tensor parallelism yet: give layout.tensor = 1")
        # The pair (first stage, last stage) of each data-parallel rank, for the tied weights' gradients;
        # every rank makes every group (new_group is a collective), in the mesh's (pp, dp) rank order.
        self.tied_group = None
        if self.tied and stages > 1:
            for dp in range(layout.data):
                ranks = [dp, (stages - 1) * layout.data + dp]
                group = dist.new_group(ranks)
                if layout.dp_rank == dp:
                    self.tied_group = group
        self.schedule = None

    def attach(self, module: nn.Module, microbatches: int, schedule: str) -> None:
        """Make the schedule around ``module`` (the stage module, possibly wrapped for data parallelism)."""
        if schedule not in SCHEDULES:
            raise ValueError(f"pp_schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
        stage = PipelineStage(module, self.layout.pp_rank, self.layout.pipeline, self.device, group=self.group)
        self.schedule = SCHEDULES[schedule](stage, n_microbatches=microbatches, loss_fn=_loss, scale_grads=True)

    def _tied_param(self) -> Optional[nn.Parameter]:
        if not self.tied or not (self.first or self.last):
            return None
        return self.module.backbone.embedding.weight if self.first else self.module.lm_head.weight

    def step(self, batch: torch.Tensor) -> torch.Tensor:
        """Forward and backward of ``batch`` (this data-parallel rank's); returns the mean loss on every stage."""
        losses: list[torch.Tensor] = []
        if self.first:
            self.schedule.step(batch, target=batch, losses=losses)
        else:
            self.schedule.step(target=batch, losses=losses)
        tied = self._tied_param()
        if tied is not None and self.first != self.last:
            grad = tied.grad.to_local() if hasattr(tied.grad, "to_local") else tied.grad
            dist.all_reduce(grad, group=self.tied_group)
        return self._last_stage_mean(losses)

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """The mean loss of ``batch``, forward only, on every stage."""
        losses: list[torch.Tensor] = []
        if self.first:
            self.schedule.eval(batch, target=batch, losses=losses)
        else:
            self.schedule.eval(target=batch, losses=losses)
        return self._last_stage_mean(losses)

    def _last_stage_mean(self, losses: list[torch.Tensor]) -> torch.Tensor:
        loss = torch.stack(losses).mean().detach().float() if self.last else torch.zeros((), device=self.device)
        # The other stages get the loss from the last one, so that every rank logs the same number.
        dist.broadcast(loss, group=self.group, group_src=self.layout.pipeline - 1)
        return loss

    def clip_grad_norm_(self, module: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients of every stage by their global norm (the tied weight counted once); returns it."""
        exclude = self._tied_param() if self.last and not self.first else None
        grads = [p.grad for p in module.parameters() if p.grad is not None and p is not exclude]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        squared = norm.float() ** 2
        dist.all_reduce(squared, group=self.group)
        total = squared.sqrt()
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(list(module.parameters()), max_norm, total)
        return total

    def full_state_dicts(
        self, module: nn.Module, optimizer: Optional[torch.optim.Optimizer]
    ) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """``training.distributed.full_state_dicts`` of the whole model: every stage's part, on global rank 0.

        A collective of every rank. The other ranks get empty dicts (and None for
        the optimizer's when ``optimizer`` is None).
        """
        options = StateDictOptions(full_state_dict=True)
        if optimizer is None:
            model_sd, optim_sd = get_model_state_dict(module, options=options), None
        else:
            model_sd, optim_sd = get_state_dict(module, optimizer, options=options)
        # Full tensors on every rank of a stage (no cpu_offload: that keeps them on global rank 0 only);
        # the first stage gathers the others' as CPU copies.
        model_sd, optim_sd = _to_cpu(model_sd), _to_cpu(optim_sd)
        parts: Optional[list[Any]] = [None] * self.layout.pipeline if self.first else None
        dist.gather_object((model_sd, optim_sd), parts, group=self.group, group_dst=0)
        if self.layout.pp_rank or self.layout.dp_rank or self.layout.tp_rank:
            return {}, None if optimizer is None else {}
        model_sd = {key: value for part, _ in parts for key, value in part.items()}
        if optimizer is None:
            return model_sd, None
        state = {key: value for _, part in parts for key, value in part["state"].items()}
        groups = [dict(group, params=[]) for group in optim_sd["param_groups"]]
        for _, part in parts:
            for merged, group in zip(groups, part["param_groups"]):
                merged["params"] += group["params"]
        if self.tied:
            # The plain model's optimizer keeps a tied weight's moments once, under the embedding's name; the
            # last stage's copy has the same ones (same start, same summed gradients).
            state.pop(_HEAD, None)
            groups = [dict(group, params=[p for p in group["params"] if p != _HEAD]) for group in groups]
        return model_sd, {"state": state, "param_groups": groups}

    def load_full_state_dicts(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict[str, Any], optim_sd: dict[str, Any]
    ) -> None:
        """Load this stage's part of full dicts (``full_state_dicts``'s or any layout's: the plain model's),
        which every rank must pass."""
        names = set(get_model_state_dict(module))
        missing = sorted(names - set(model_sd))
        if missing:
            raise ValueError(f"model_sd lacks this stage's {missing[:3]}...: pass the whole model's dicts on every rank")
        params = {name for name, _ in module.named_parameters()}
        options = StateDictOptions(full_state_dict=True)
        if self.tied and self.last and not self.first:  # the head's copy takes the embedding's moments
            optim_sd = {
                "state": {**optim_sd["state"], _HEAD: optim_sd["state"][_EMBEDDING]},
                "param_groups": [
                    dict(g, params=[_HEAD if p == _EMBEDDING else p for p in g["params"]])
                    for g in optim_sd["param_groups"]
                ],
            }
        set_model_state_dict(module, {k: v for k, v in model_sd.items() if k in names}, options=options)
        optim_sd = {
            "state": {k: {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in v.items()}
                      for k, v in optim_sd["state"].items() if k in params},
            "param_groups": [dict(g, params=[p for p in g["params"] if p in params]) for g in optim_sd["param_groups"]],
        }
        set_optimizer_state_dict(module, optimizer, optim_sd, options=options)


def _to_cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: _to_cpu(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(value) for value in tree)
    return tree
