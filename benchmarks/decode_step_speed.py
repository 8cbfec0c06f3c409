#!/usr/bin/env python
"""The CPU decode step three ways, in one run: op by op, fused C++ block steps, and torch.compile.

Usage::

    python benchmarks/decode_step_speed.py                  # mamba-130m, fp32, 2 threads, batch 1
    python benchmarks/decode_step_speed.py --presets mamba-130m mamba2-130m --batch 1 8
    python benchmarks/decode_step_speed.py --no-compile     # without the (slow to build) compiled rows
    python benchmarks/decode_step_speed.py --quick          # a tiny model (CI)

Each row is one decode step (one token per row of the batch) of the same model on
its own cache, after a 16-token prompt: the time of ``--tokens`` consecutive steps,
median of ``--repeats`` after a warm-up round, as tokens/s. The rows take turns (one
run of each per round), so that the drift of a shared machine falls on all alike:

- ``eager``: ``model(ids, cache=cache)``, the forward op by op (``generate(..., fused_step=False)``);
- ``fused``: ``model.fused_decoder(cache)``, one C++ call per block (``generate``'s CPU default);
- ``compile``: ``torch.compile(model.decode_logits, fullgraph=True)`` with inductor (its C++/OpenMP
  code generation), the model's kernels kept as custom ops and inductor generating the glue;
- ``compile torch-ops``: the same on a ``backend="reference"`` twin (same weights): every op is
  torch's, so inductor also generates the conv and state updates, and calls the BLAS for the
  projections;
- ``compile torch-ops frozen``: that, with inductor's ``freezing`` (weights as constants, the
  projections prepacked for oneDNN) and ``cpp_wrapper`` (no Python between kernels).

Compile times are from cold (inductor's caches in a directory of the run's own).
The caches are static as in gpt-fast: allocated once, updated in place by every path
(a Mamba state does not grow, so no position-indexed write is needed). The compiled
rows report their compile time (their first two calls: the compile, and the one
recompile once the layers' position counters turn dynamic) and the compiles after
those (0: no recompile per token). Every row's logits on the first step are compared
with eager's. The bound is ``batch * copy bandwidth / weight bytes`` (every weight
read once per step; copy bandwidth measured before and after the rows, the better
kept). Results go to ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from lnlm_ssm import MambaLM
from lnlm_ssm.models import preset
from lnlm_ssm.utils.benchmark import measure_copy_bandwidth, median, torch_threads

HERE = Path(__file__).resolve().parent
PROMPT = 16
QUICK = dict(d_model=64, n_layer=2, vocab_size=304)
COMPILED = {
    "compile": ("auto", {}),
    "compile torch-ops": ("reference", {}),
    "compile torch-ops frozen": ("reference", {"freezing": True, "cpp_wrapper": True}),
}


@contextlib.contextmanager
def patched_environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


class CountingInductor:
    """Inductor as a torch.compile backend, with ``config`` patched, counting the graphs it compiles."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(gm, example_inputs, config_patches=self.config)


def prefilled(model: MambaLM, prompt: torch.Tensor, capacity: int):
    cache = model.allocate_cache(prompt.shape[0], PROMPT + capacity)
    model(prompt, cache=cache, num_last_tokens=1)
    return cache


def steps(model: MambaLM, args, prompt, ids, capacity: int) -> dict[str, tuple[Callable, dict]]:
    """Each row's step ``(ids (batch, 1)) -> logits`` and what building it reported."""
    cache = prefilled(model, prompt, capacity)
    out = {
        "eager": (lambda ids, cache=cache: model(ids, cache=cache, num_last_tokens=1).logits[:, -1], {}),
        "fused": (model.fused_decoder(prefilled(model, prompt, capacity)), {}),
    }
    if args.no_compile:
        return out
    torch._dynamo.reset()
    for name, (backend, config) in COMPILED.items():
        # A model of its own per compiled row (its guards then never match another row's), same weights.
        twin = MambaLM(model.config, backend=backend).eval()
        twin.load_state_dict(model.state_dict())
        cache = prefilled(twin, prompt, capacity)
        inductor = CountingInductor(config)
        compiled = torch.compile(twin.decode_logits, fullgraph=True, backend=inductor)
        # The warm-up calls step the cache: put it back, so that the first timed step is comparable with eager's.
        saved, seqlen = [t.clone() for t in cache.tensors()], cache.seqlen
        t0 = time.perf_counter()
        for _ in range(2):
            compiled(ids, cache.layers)
        for tensor, value in zip(cache.tensors(), saved):
            tensor.copy_(value)
        cache.set_seqlen(seqlen)
        built = {"compile_s": time.perf_counter() - t0, "inductor": inductor, "graphs": inductor.compiles}
        out[name] = (lambda ids, compiled=compiled, layers=cache.layers: compiled(ids, layers), built)
    return out


def measure(name: str, model: MambaLM, args, batch: int, bound: float) -> list[dict]:
    """Every row's tokens/s; the rows take turns, one run of ``--tokens`` steps each per round, so that a
    shared machine's drift in bandwidth falls on all of them alike (the first round is the warm-up)."""
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, vocab, (batch, 1), generator=torch.Generator().manual_seed(2))
    capacity = (args.repeats + 2) * args.tokens + 2
    with torch.no_grad():
        built = steps(model, args, prompt, ids, capacity)
        logits = {row: step(ids) for row, (step, _) in built.items()}
        times = {row: [] for row in built}
        for i in range(args.repeats + 1):
            for row, (step, _) in built.items():
                t0 = time.perf_counter()
                for _ in range(args.tokens):
                    step(ids)
                if i:
                    times[row].append(time.perf_counter() - t0)
    rows = []
    for row, (_, report) in built.items():
        tok_s = batch * args.tokens / median(times[row])
        r = {"preset": name, "batch": batch, "row": row, "tok_s": tok_s, "of_bound": tok_s / bound,
             "x_eager": median(times["eager"]) / median(times[row]),
             "logits_max_abs_diff_vs_eager": (logits[row] - logits["eager"]).abs().max().item(), "times_s": times[row]}
        if report:
            r["compile_s"] = report["compile_s"]
            r["graphs_compiled_in_warmup"] = report["graphs"]
            r["recompiles_after_warmup"] = report["inductor"].compiles - report["graphs"]
        rows.append(r)
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["mamba-130m"])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--tokens", type=int, default=32, help="consecutive steps per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--quick", action="store_true", help="a tiny model, few steps (CI)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    for name in ("tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.batch) < 1:
        p.error(f"--batch sizes must be >= 1, got {args.batch}")
    if args.quick:
        args.tokens, args.repeats = 2, 1
    args.out = args.out or HERE / "out" / f"decode_step-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    # Compile times from cold: inductor's caches (graphs, generated C++) go to a directory of this run's own.
    with tempfile.TemporaryDirectory() as cache_dir, patched_environ(TORCHINDUCTOR_CACHE_DIR=cache_dir), \
            torch_threads(args.threads):
        copy_before = measure_copy_bandwidth("cpu", nbytes=(16 << 20) if args.quick else None)
        for name in args.presets:
            torch.manual_seed(args.seed)
            model = MambaLM(preset(name, **(QUICK if args.quick else {}))).eval()
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            for batch in args.batch:
                rows += measure(name, model, args, batch, batch * copy_before * 1e9 / weight_bytes)
        copy_after = measure_copy_bandwidth("cpu", nbytes=(16 << 20) if args.quick else None)
    copy_bw = max(copy_before, copy_after)
    for r in rows:  # the bound from the better of the two measures
        r["of_bound"] *= copy_before / copy_bw
    print(f"# {platform.processor() or platform.machine()}, fp32, {args.threads} threads, torch {torch.__version__}; "
          f"copy bandwidth {copy_bw:.1f} GB/s (before {copy_before:.1f}, after {copy_after:.1f})")
    print(f"{'preset':<12} {'batch':>5}  {'row':<26} {'tok/s':>8} {'x eager':>8} {'of bound':>9} "
          f"{'logits diff':>11} {'compile s':>9} {'recompiles':>10}")
    for r in rows:
        extra = f"{r['compile_s']:>9.1f} {r['recompiles_after_warmup']:>10}" if "compile_s" in r else f"{'-':>9} {'-':>10}"
        print(f"{r['preset']:<12} {r['batch']:>5}  {r['row']:<26} {r['tok_s']:>8.1f} {r['x_eager']:>7.2f}x "
              f"{r['of_bound']:>8.0%} {r['logits_max_abs_diff_vs_eager']:>11.2g} {extra}")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.json", "w") as f:
        json.dump({
            "benchmark": "decode_step_speed",
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                        "torch": torch.__version__},
            "copy_bandwidth_gb_per_s": {"before": copy_before, "after": copy_after, "used": copy_bw},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": rows,
        }, f, indent=2)
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
