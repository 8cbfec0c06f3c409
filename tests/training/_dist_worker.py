"""Train a tiny MambaLM on fixed synthetic data, in one process or as one torchrun worker.

    python -m torch.distributed.run --nproc-per-node 2 --standalone tests/training/_dist_worker.py \
        --mode fsdp --out DIR

Every step takes the same global batch; under torchrun rank r trains on its
slice of it. After ``--resume-at`` steps the run saves full state dicts, builds a
fresh model and optimizer from another seed, loads them and goes on, so its
losses match an uninterrupted run only if saving and loading lose nothing.
Each rank writes ``DIR/result-{rank}.pt``: the per-step global losses, what
``full_state_dicts`` gave it at the end, the parameters as the wrapped model
holds them (gathered), and the logits of a probe batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lnlm_ssm.models import MambaLM, preset
from lnlm_ssm.training.distributed import (
    all_reduce_mean,
    cleanup,
    full_state_dicts,
    load_full_state_dicts,
    setup,
    wrap_model,
)

GLOBAL_BATCH, SEQLEN, VOCAB = 4, 16, 257
CONFIG = dict(d_model=32, n_layer=2, vocab_size=VOCAB)
# float64, so that the only difference between a run in one process and in two (the
# order of the gradient sums) stays far below the tolerance even after AdamW, whose
# normalisation magnifies round-off in near-zero gradients.
DTYPE = torch.float64


def make_data(steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (steps, GLOBAL_BATCH, SEQLEN), generator=generator)


def probe_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQLEN), generator=torch.Generator().manual_seed(99))


def build(mode: str, info, seed: int):
    # Each rank draws other initial weights: wrap_model must start all from rank 0's.
    torch.manual_seed(seed + 1000 * info.rank)
    model = wrap_model(MambaLM(preset("mamba-tiny", **CONFIG), dtype=DTYPE), mode, info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def gathered_parameters(model) -> dict[str, torch.Tensor]:
    # FSDP2 holds DTensor shards; full_tensor() all-gathers them (a collective: every rank calls it).
    plain = getattr(model, "module", model)  # DDP's wrapper names them module.*
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
        for name, p in plain.named_parameters()
    }


def run(mode: str, steps: int, resume_at: int, info) -> dict:
    data = make_data(steps)
    local = GLOBAL_BATCH // info.world_size
    rows = slice(info.rank * local, (info.rank + 1) * local)
    model, optimizer = build(mode, info, seed=0)
    losses = []
    for step in range(steps):
        if step == resume_at:
            model_sd, optim_sd = full_state_dicts(model, optimizer, info)
            model, optimizer = build(mode, info, seed=1)
            load_full_state_dicts(model, optimizer, model_sd, optim_sd, info)
        batch = data[step, rows].to(info.device)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(all_reduce_mean(loss.detach(), info).item())
    model_sd, optim_sd = full_state_dicts(model, optimizer, info)
    reported = gathered_parameters(model)
    with torch.no_grad():
        probe_logits = model(probe_batch().to(info.device)).logits.cpu()
    return dict(
        losses=losses, model_sd=model_sd, optim_sd=optim_sd, reported=reported, probe_logits=probe_logits
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("none", "ddp", "fsdp"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resume-at", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = setup()
    if setup() != info:  # a second call joins nothing twice and says the same
        raise AssertionError(f"setup() is not idempotent: {info} then {setup()}")
    try:
        result = run(args.mode, args.steps, args.resume_at, info)
        torch.save(result, args.out / f"result-{info.rank}.pt")
    finally:
        cleanup(info)


if __name__ == "__main__":
    main()
