"""Data-parallel training under ``torchrun``: process group, DDP or FSDP2, full checkpoints.

One script runs in one process or under torchrun unchanged::

    info = setup()                              # torchrun's env, or a single process
    model = wrap_model(model, "fsdp", info)     # "none" | "ddp" | "fsdp"
    optimizer = torch.optim.AdamW(model.parameters())
    ...                                         # each rank feeds its own slice of the global batch
    model_sd, optim_sd = full_state_dicts(model, optimizer, info)   # on every rank
    if is_main(info):
        ...                                     # save them: they load into a plain MambaLM
    cleanup(info)

Each rank computes the mean loss of its local batch; DDP and FSDP average the
gradients over ranks, so with equal local batches a step equals a single-process
step on the global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from lnlm_ssm.training.parallel.tensor import from_plain, plain_orders, to_plain
from lnlm_ssm.utils.checks import check_choice

__all__ = [
    "DistInfo",
    "MODES",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "full_state_dicts",
    "is_main",
    "load_full_state_dicts",
    "setup",
    "wrap_model",
]

MODES = ("none", "ddp", "fsdp")

# Set by torchrun (and by torch.distributed.run, its module form) in every worker.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``backend`` is None when there is no process group (a single process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {value!r}") from None


def _launched_by_torchrun() -> bool:
    present = [name for name in _TORCHRUN_ENV if name in os.environ]
    if present and len(present) < len(_TORCHRUN_ENV):
        missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
        raise ValueError(
            f"environment has {present} but not {missing}: launch with torchrun, which sets all of "
            f"{list(_TORCHRUN_ENV)}, or unset them for a single process"
        )
    return bool(present)


def setup() -> DistInfo:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA), or describe a single process.

    Under torchrun each process uses ``cuda:LOCAL_RANK`` when CUDA is available and
    the CPU otherwise. Without torchrun's environment there is no process group:
    rank 0 of 1, on ``cuda`` if available, else the CPU. Calling it again returns
    the same answer without initialising anything twice.
    """
    if not _launched_by_torchrun():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"torchrun environment is inconsistent: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}"
        )
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # device_id binds nccl's communicator to this rank's GPU up front (and lets barrier know it).
        dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device if backend == "nccl" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=dist.get_backend())


def _check_info(info: Any) -> None:
    if not isinstance(info, DistInfo):
        raise TypeError(f"info must be the DistInfo that setup() returns; got {type(info).__name__}")


def _distributed(info: DistInfo) -> bool:
    return info.backend is not None and dist.is_initialized()


def is_main(info: DistInfo) -> bool:
    """True on rank 0: the process that logs and writes files."""
    _check_info(info)
    return info.rank == 0


def barrier(info: DistInfo) -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    _check_info(info)
    if _distributed(info):
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group, if there is one; safe to call twice."""
    _check_info(info)
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``tensor`` over ranks, as a new tensor on ``tensor``'s device (``tensor`` is left as is)."""
    _check_info(info)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor; got {type(tensor).__name__}")
    if not _distributed(info):
        return tensor.detach().clone()
    # nccl reduces only CUDA tensors, gloo only CPU ones: go through this rank's device.
    buffer = tensor.detach().to(info.device, copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return (buffer / info.world_size).to(tensor.device)


def _broadcast_from_rank0(model: nn.Module, group) -> None:
    # fully_shard keeps each rank's own slice of its own initial values: without this,
    # ranks seeded differently would train a patchwork. DDP does the same at construction.
    # A tensor-parallel DTensor is broadcast shard by shard, within the data-parallel group.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            dist.broadcast(local, group=group, group_src=0)


def wrap_model(model: nn.Module, mode: str, info: DistInfo, mesh=None) -> nn.Module:
    """``model`` on ``info.device``, data-parallel as ``mode`` says, over ``mesh`` (default: every rank).

    - ``"none"``: the model itself.
    - ``"ddp"``: ``DistributedDataParallel``; every rank holds all the weights.
    - ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on each block of
      ``model.backbone.layers`` and then on the model, so a block's weights are
      gathered only while it runs. Parameters become DTensors; make the optimizer
      after wrapping. The model is modified in place and returned.

    Both start every rank from rank 0's weights. ``"ddp"`` and ``"fsdp"`` need the
    process group of ``setup()`` under torchrun.

    ``mesh``: the 1-D data-parallel ``DeviceMesh`` of a layout with model
    parallelism (``training.parallel.Layout``), whose ranks hold the same part of
    the model. A model split over other ranks too (tensor parallel: DTensor
    parameters; a pipeline stage) is made data-parallel by FSDP2 (``"fsdp"``, as
    FSDP2 + TP) or by ``replicate`` (``"ddp"``: DDP's all-reduce of gradients on
    FSDP2's machinery, which takes DTensors and which pipeline stages know).
    """
    _check_info(info)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    check_choice("mode", mode, MODES)
    model = model.to(info.device)
    if mode == "none":
        return model
    if not _distributed(info):
        raise ValueError(
            f"mode={mode!r} needs a process group: launch with `torchrun --nproc-per-node N ...` and call "
            "setup() first, or use mode='none' in a single process"
        )
    from torch.distributed.tensor import DTensor

    # DDP holds whole plain tensors of the whole model; a model split over other ranks takes replicate.
    model_parallel = mesh is not None and mesh.size() != info.world_size
    if mode == "ddp" and not model_parallel and not any(isinstance(p, DTensor) for p in model.parameters()):
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        group = None if mesh is None else mesh.get_group()
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=group)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = init_device_mesh(info.device.type, (info.world_size,))
    if mode == "ddp":
        from torch.distributed._composable.replicate_with_fsdp import replicate as shard
    else:
        shard = fully_shard
    _broadcast_from_rank0(model, mesh.get_group())
    blocks = getattr(getattr(model, "backbone", None), "layers", ())
    for block in blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks:  # a pipeline stage's blocks
        shard(block, mesh=mesh)
    shard(model, mesh=mesh)
    return model


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state_dicts(
    model: nn.Module, optimizer: Optional[torch.optim.Optimizer], info: DistInfo
) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """Unsharded CPU ``(model_sd, optim_sd)`` of a model wrapped by ``wrap_model`` (any mode).

    A collective: call it on every rank. Under a process group only rank 0 receives
    the tensors; the other ranks get empty dicts (so only rank 0 pays the memory).
    ``model_sd`` has the plain model's keys (no ``module.`` prefix), loadable with
    ``MambaLM(config).load_state_dict(model_sd)``; ``optim_sd`` is keyed by those
    parameter names rather than by position, as ``torch.distributed.checkpoint``
    writes it, and is None when ``optimizer`` is None.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    _check_info(info)
    options = _state_dict_options(cpu_offload=True)
    if optimizer is None:
        model_sd, optim_sd = get_model_state_dict(model, options=options), None
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    # Unsharded CPU tensors come back as the live parameters and optimizer state themselves
    # (nothing to gather or offload): copy those, so the dicts stay what they were when taken.
    live = _storages([*model.parameters(), *model.buffers()])
    if optimizer is not None:
        live |= _storages(t for state in optimizer.state.values() for t in state.values())

    def snapshot(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.untyped_storage().data_ptr() in live else t

    model_sd, optim_sd = _map_tensors(model_sd, snapshot), _map_tensors(optim_sd, snapshot)
    # Tensor parallelism holds some parameters in a per-rank order of their rows: put them back.
    orders = plain_orders(model)
    if orders and model_sd:
        model_sd = to_plain(model_sd, orders)
        if optim_sd is not None:
            optim_sd = {**optim_sd, "state": to_plain(optim_sd["state"], orders)}
    return model_sd, optim_sd


def _storages(tensors) -> set[int]:
    from torch.distributed.tensor import DTensor

    # A DTensor's full tensor is always a new one: only plain tensors can be shared.
    return {
        t.untyped_storage().data_ptr()
        for t in tensors
        if isinstance(t, torch.Tensor) and not isinstance(t, DTensor)
    }


def _map_tensors(tree: Any, fn) -> Any:
    """``tree`` (nested dicts, lists, tuples) with ``fn`` applied to each tensor in it."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {key: _map_tensors(value, fn) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_tensors(value, fn) for value in tree)
    return tree


def load_full_state_dicts(
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    model_sd: dict[str, torch.Tensor],
    optim_sd: Optional[dict[str, Any]],
    info: DistInfo,
) -> None:
    """Load what ``full_state_dicts`` returned into a wrapped ``model`` (and ``optimizer``), in place.

    A collective: call it on every rank. Under a process group only rank 0's dicts
    are read and broadcast; the other ranks may pass empty dicts. Give
    ``optimizer=None`` and ``optim_sd=None`` to load the model alone.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    _check_info(info)
    if (optimizer is None) != (optim_sd is None):
        raise ValueError("give both optimizer and optim_sd, or neither (to load the model alone)")
    options = _state_dict_options(broadcast_from_rank0=_distributed(info))
    orders = plain_orders(model)
    if orders and model_sd:
        model_sd = from_plain(model_sd, orders)
        if optim_sd:
            optim_sd = {**optim_sd, "state": from_plain(optim_sd["state"], orders)}
    if optim_sd is not None:
        # Optimizer.load_state_dict adopts tensors already on the right device as its state,
        # which would tie the caller's dict (and any optimizer loaded from it) to this one.
        optim_sd = _map_tensors(optim_sd, torch.clone)
    # Two calls, not set_state_dict: it takes an empty model_sd (what ranks > 0 hold) to
    # mean "optimizer only" and skips the model's broadcast there, hanging rank 0.
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
