"""Bytes per rank of parameters, gradients and AdamW state, and collectives per step, under TP and PP (measured).

    python benchmarks/parallel_memory.py                                                  # one process
    torchrun --nproc-per-node 2 --standalone benchmarks/parallel_memory.py --tensor-parallel 2
    torchrun --nproc-per-node 2 --standalone benchmarks/parallel_memory.py --pipeline-parallel 2

The model is the hybrid-tiny preset with 2 SSM groups (so that it splits in
two), or ``--preset mamba-tiny`` (Mamba-1), fp32. After one training step each rank counts the bytes of its own
shards (a DTensor's local tensor; a pipeline stage's parameters) and of what
AdamW keeps for them, and the profiler counts the collectives of a second step
(the backend's records: gloo:all_reduce, gloo:send, ...). Rank 0 prints
one row per rank and writes ``--json``. docs/scaling.md compares these with its
formulas.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from lnlm_ssm.models import MambaLM, preset
from lnlm_ssm.training.distributed import cleanup, setup
from lnlm_ssm.training.parallel import Layout
from lnlm_ssm.training.parallel.pipeline import Pipeline
from lnlm_ssm.training.parallel.tensor import tensor_parallel

BATCH, SEQLEN = 4, 64


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--pipeline-parallel", type=int, default=1)
    parser.add_argument("--preset", choices=("hybrid-tiny", "mamba-tiny"), default="hybrid-tiny")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here (rank 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = setup()
    torch.manual_seed(0)
    config = preset(args.preset)
    if config.ssm_cfg.get("layer") == "Mamba2":  # the preset's single group cannot be split
        config = preset(args.preset, ssm_cfg={**config.ssm_cfg, "ngroups": 2})
    model = MambaLM(config, backend="cpu")
    layout = Layout.of(info, tensor=args.tensor_parallel, pipeline=args.pipeline_parallel)
    pipeline = None
    if layout.tensor > 1:
        tensor_parallel(model, layout.mesh["tp"])
    if layout.pipeline > 1:
        pipeline = Pipeline(model, layout, info.device)
        model = pipeline.module
        pipeline.attach(model, microbatches=2, schedule="1f1b")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 257, (BATCH, SEQLEN), generator=torch.Generator().manual_seed(1))

    def step():
        optimizer.zero_grad(set_to_none=False)
        if pipeline is not None:
            pipeline.step(batch)
        else:
            # Tensor parallel logits are sharded by vocabulary: their loss is loss_parallel's.
            with loss_parallel() if layout.tensor > 1 else contextlib.nullcontext():
                model(batch, labels=batch).loss.backward()
        optimizer.step()

    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    collectives = Counter()
    for event in prof.events():
        # The backend's own record of each collective ("gloo:all_reduce"); c10d's and the functional
        # collectives' records of the same call are not counted again.
        backend, _, kind = event.name.partition(":")
        if backend in ("gloo", "nccl"):
            collectives[kind] += 1
    params = list(model.parameters())
    row = dict(
        rank=info.rank,
        world=info.world_size,
        tensor_parallel=layout.tensor,
        pipeline_parallel=layout.pipeline,
        params=sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params),
        param_bytes=local_bytes(params),
        grad_bytes=local_bytes(p.grad for p in params if p.grad is not None),
        optimizer_bytes=local_bytes(
            t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.ndim
        ),
        collectives_per_step=dict(collectives),
    )
    rows = [None] * info.world_size if info.world_size > 1 else [row]
    if info.world_size > 1:
        dist.all_gather_object(rows, row)
    if info.rank == 0:
        for r in rows:
            print(json.dumps(r))
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    cleanup(info)


if __name__ == "__main__":
    main()
