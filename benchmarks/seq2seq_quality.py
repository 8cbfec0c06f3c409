#!/usr/bin/env python
"""Encoder-decoders side by side: attention T5, Mamba (Hydra encoder, Mamba-2 decoder) and a hybrid.

Usage::

    python benchmarks/seq2seq_quality.py --quick      # CI's smoke run: a few steps, short sequences
    python benchmarks/seq2seq_quality.py              # the run of record (594 s on 2 quiet cores)

Every family has about the same parameters (1.23M: T5's and the hybrid's FFN
widths are raised to the Mamba model's count), the byte tokenizer with 100
sentinel ids above it, the same seed, tokens and schedule (AdamW, warmup 10% of
the steps, cosine decay to lr / 10), and the same learning rates to try
(``--lrs``; each family keeps its best by held-out span loss). Families:

- ``t5``: ``t5-tiny``, attention in both stacks (T5 v1.1: gated-GELU FFN, relative position bias);
- ``mamba``: ``hydra-mamba2-t5-tiny``, Hydra (bidirectional Mamba-2) encoder, Mamba-2 decoder with
  cross-attention;
- ``hybrid``: ``hybrid-t5-tiny``, the two alternating in each stack.

Measured, in one run:

1. **Span corruption** (T5's pretraining: noise density 0.15, mean span 3) on the Python
   standard library's source, through ``lnlm-ssm train --objective span``: held-out loss
   (nats per target token) and target-token accuracy on the same held-out windows and
   spans for every family; training tokens/s (the median of the loop's per-step figures after
   the first 10% of the steps: no setup, evaluation or checkpoints).
2. **Text-to-text fine-tuning** from the span checkpoint, through ``lnlm-ssm train --objective
   seq2seq --init-from`` (the test pairs its ``--eval-data``), on docstring -> function name
   (``lnlm_ssm.data.docstring_names``: the stdlib's functions, train and test from
   disjoint source files; pairs whose name does not fit ``--seq-len`` are dropped):
   exact match of the greedy output on the test pairs, their teacher-forced
   target-token accuracy, and generation tokens/s (greedy, batches of 16, every row
   counted until the batch ends, after one untimed call).

Results go to ``results.json`` and ``seq2seq_quality.png`` under ``--out``; each
training run's metrics, checkpoints and model under ``--out/runs/``. The
models are small and far from converged: the table says who learns fastest early
at this size, not who wins at scale; exact match of a tiny model on unseen
functions' names is near zero, and the token accuracy is the finer signal.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

if importlib.util.find_spec("lnlm_ssm") is None:  # a checkout that was never `pip install`ed
    sys.path.insert(0, str(REPO_ROOT))

from lnlm_ssm.data import default_corpus_dir  # noqa: E402
from lnlm_ssm.data.docstring_names import docstring_pairs, write_jsonl  # noqa: E402
from lnlm_ssm.data.text_pairs import encode_pair, pair_batch  # noqa: E402
from lnlm_ssm.data.tokenizers import ByteTokenizer  # noqa: E402
from lnlm_ssm.models import Seq2SeqLM, preset  # noqa: E402
from lnlm_ssm.objectives import Seq2SeqObjective  # noqa: E402
from lnlm_ssm.training.config import TrainConfig  # noqa: E402
from lnlm_ssm.training.loop import train  # noqa: E402
from lnlm_ssm.training.metrics import read_metrics  # noqa: E402
from lnlm_ssm.utils.benchmark import learning_rate, median, name_list, positive_int, torch_threads  # noqa: E402


@dataclass(frozen=True)
class Family:
    name: str
    preset: str
    model: dict[str, Any]
    about: str


# FFN widths that bring t5 and hybrid to the mamba model's 1.23M parameters.
FAMILIES = {
    f.name: f
    for f in (
        Family("t5", "t5-tiny", {"d_ff": 512}, "attention encoder and decoder (T5 v1.1)"),
        Family("mamba", "hydra-mamba2-t5-tiny", {}, "Hydra encoder, Mamba-2 decoder + cross-attention"),
        Family("hybrid", "hybrid-t5-tiny", {"d_ff": 448}, "Hydra/attention encoder, Mamba-2/attention decoder"),
    )
}

QUICK = dict(steps=6, ft_steps=6, batch_size=4, seq_len=64, eval_batches=1, lrs=[2e-3], max_files=(12, 4),
             test_rows=16, max_bytes=300_000)
# 150 + 150 steps at one lr took 217 s on 2 quiet cores (EPYC), its models far from trained: the run of record
# spends the 20-minute budget on longer training and two learning rates per family.
FULL = dict(steps=400, ft_steps=400, batch_size=16, seq_len=128, eval_batches=8, lrs=[1e-3, 3e-3],
            max_files=(400, 100), test_rows=256, max_bytes=4_000_000)
GEN_BATCH = 16


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied tensor counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def family_params(family: Family) -> int:
    return count_params(Seq2SeqLM(preset(family.preset, **family.model), device="meta"))


def pretrain(family: Family, lr: float, args, out: Path) -> dict[str, Any]:
    """Span corruption through the training loop; the final held-out figures and the model directory."""
    config = TrainConfig(
        preset=family.preset, objective="span", model=dict(family.model), out=str(out),
        data=str(args.data or default_corpus_dir()), max_bytes=args.max_bytes, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=lr, min_lr=lr / 10,
        warmup_steps=max(1, args.steps // 10), eval_every=args.steps, eval_batches=args.eval_batches,
        ckpt_every=args.steps, keep_last=1, seed=args.seed, device="cpu", dtype="fp32",
    )
    result = train(config)
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    speed = median([r["tokens_per_s"] for r in steps[len(steps) // 10 :]])
    return {"lr": lr, "span_loss": result["eval_loss"], "span_accuracy": result["eval_accuracy"],
            "train_tokens_per_s": speed, "tokens": result["tokens"], "model_dir": result["model_dir"]}


def finetune(model_dir: str, lr: float, files: tuple[Path, Path], args, out: Path) -> Seq2SeqLM:
    """``args.ft_steps`` steps of the seq2seq objective on ``files`` (training rows, held-out rows) from the span
    checkpoint ``model_dir``, as ``lnlm-ssm train --objective seq2seq --init-from`` runs them, on the pretraining
    schedule."""
    config = TrainConfig(
        objective="seq2seq", init_from=model_dir, data=str(files[0]), eval_data=str(files[1]), out=str(out),
        steps=args.ft_steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr, min_lr=lr / 10,
        warmup_steps=max(1, args.ft_steps // 10), eval_every=args.ft_steps, eval_batches=args.eval_batches,
        ckpt_every=args.ft_steps, keep_last=1, seed=args.seed, device="cpu", dtype="fp32",
    )
    return Seq2SeqLM.from_pretrained(train(config)["model_dir"]).eval()


@torch.no_grad()
def score(model: Seq2SeqLM, test: list[tuple[list[int], list[int]]], targets: list[str], seq_len: int):
    """(exact match, teacher-forced token accuracy, generation tokens/s) on the test pairs."""
    tokenizer = ByteTokenizer()
    objective = Seq2SeqObjective()
    objective.use_tokenizer(tokenizer)
    hits, correct, counted, generated, seconds = 0, 0.0, 0, 0, 0.0
    warm = pair_batch(test[:1], seq_len, tokenizer.pad_token_id)[:, 0]
    model.generate(warm, max_new_tokens=2)  # untimed: first calls pay for lazy setup
    for start in range(0, len(test), GEN_BATCH):
        batch = pair_batch(test[start : start + GEN_BATCH], seq_len, tokenizer.pad_token_id)
        labels = batch[:, 1]
        n = int((labels != -100).sum())
        correct += objective(model, batch).metrics["accuracy"].item() * n
        counted += n
        source = batch[:, 0]
        begin = time.perf_counter()
        out = model.generate(source, attention_mask=source != tokenizer.pad_token_id,
                             max_new_tokens=int((labels != -100).sum(1).max()), eos_token_id=tokenizer.eos_token_id)
        seconds += time.perf_counter() - begin
        generated += out[:, 1:].numel()
        for row, target in zip(out[:, 1:].tolist(), targets[start : start + GEN_BATCH]):
            row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            hits += tokenizer.decode(row) == target
    return hits / len(test), correct / counted, generated / seconds


def task_files(args, out: Path) -> tuple[Path, Path, list[dict[str, str]]]:
    """The training and test JSONL of the docstring task and the test rows, all without names too long for
    seq_len."""
    fits = lambda row: len(row["target"].encode()) < args.seq_len  # noqa: E731 - with its EOS
    train_rows = [r for r in docstring_pairs("train", max_files=args.max_files[0]) if fits(r)]
    test_rows = [r for r in docstring_pairs("test", max_files=args.max_files[1]) if fits(r)][: args.test_rows]
    train_file = write_jsonl(train_rows, out / "docstrings-train.jsonl")
    return train_file, write_jsonl(test_rows, out / "docstrings-test.jsonl"), test_rows


def write_plot(path: Path, rows: list[dict], title: str) -> Optional[str]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        return f"plot skipped: matplotlib not installed ({exc})"
    figure = Figure(figsize=(12, 3.8), dpi=110)
    FigureCanvasAgg(figure)
    panels = [("span_loss", "held-out span loss (nats)"), ("token_accuracy", "docstring->name token accuracy"),
              ("train_tokens_per_s", "span training tokens/s"), ("gen_tokens_per_s", "generation tokens/s")]
    for axis, (key, label) in zip(figure.subplots(1, len(panels)), panels):
        axis.bar([r["model"] for r in rows], [r[key] for r in rows], color=[f"C{i}" for i in range(len(rows))])
        axis.set_title(label, fontsize=9)
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return None





def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"CI's smoke run: {QUICK}")
    p.add_argument("--steps", type=positive_int, help=f"span-corruption steps per model (default {FULL['steps']})")
    p.add_argument("--ft-steps", type=positive_int, help=f"fine-tuning steps per model (default {FULL['ft_steps']})")
    p.add_argument("--batch-size", type=positive_int, help=f"sequences per step (default {FULL['batch_size']})")
    p.add_argument("--seq-len", type=positive_int, help=f"tokens per sequence (default {FULL['seq_len']})")
    p.add_argument("--lrs", type=learning_rate, nargs="+",
                   help=f"peak learning rates every family tries (default {FULL['lrs']})")
    p.add_argument("--families", type=name_list("--families", FAMILIES), default=list(FAMILIES),
                   help=f"comma list of {list(FAMILIES)}")
    p.add_argument("--data", type=Path, help="span-corruption text: a file or directory (default: the stdlib)")
    p.add_argument("--max-bytes", type=positive_int, help=f"read at most this much text (default {FULL['max_bytes']})")
    p.add_argument("--max-files", type=positive_int, nargs=2, metavar=("TRAIN", "TEST"),
                   help=f"source files the docstring task reads per split (default {FULL['max_files']})")
    p.add_argument("--test-rows", type=positive_int, help=f"docstring test pairs scored (default {FULL['test_rows']})")
    p.add_argument("--eval-batches", type=positive_int, help="held-out span batches at the end of pretraining")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--out", type=Path, help="default benchmarks/out/seq2seq_quality-<timestamp>/")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for name, value in sizes.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.out = args.out or HERE / "out" / f"seq2seq_quality-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} is not empty: choose another directory")
    args.out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    tokens = args.steps * args.batch_size * args.seq_len
    print(f"# span: {args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} tokens per model; "
          f"fine-tuning {args.ft_steps} steps; lrs {args.lrs}; seed {args.seed}; {args.threads} threads; "
          f"torch {torch.__version__}")
    train_file, test_file, test_rows = task_files(args, args.out)
    tokenizer = ByteTokenizer()
    test = [encode_pair(tokenizer, r["input"], r["target"], args.seq_len, "test") for r in test_rows]
    targets = [r["target"] for r in test_rows]
    print(f"# docstring -> name: {sum(1 for _ in train_file.open())} training pairs, {len(test)} test pairs")
    tried, rows = [], []
    with torch_threads(args.threads):
        for name in args.families:
            family = FAMILIES[name]
            runs = [pretrain(family, lr, args, args.out / "runs" / f"{name}-lr{lr:g}") for lr in args.lrs]
            tried += [{"model": name, **r} for r in runs]
            best = min(runs, key=lambda r: r["span_loss"] if math.isfinite(r["span_loss"]) else math.inf)
            files, run_dir = (train_file, test_file), args.out / "runs" / f"{name}-finetune"
            model = finetune(best["model_dir"], best["lr"], files, args, run_dir)
            exact, accuracy, gen_speed = score(model, test, targets, args.seq_len)
            row = {"model": name, "preset": family.preset, "about": family.about, "params": count_params(model),
                   **{k: v for k, v in best.items() if k != "model_dir"}, "exact_match": exact,
                   "token_accuracy": accuracy, "gen_tokens_per_s": gen_speed}
            rows.append(row)
            print(f"| {name:7s} | {row['params'] / 1e6:.2f}M | lr {row['lr']:g} | span loss {row['span_loss']:.4f} "
                  f"| span acc {row['span_accuracy']:.3f} | exact {exact:.3f} | token acc {accuracy:.3f} "
                  f"| train {row['train_tokens_per_s']:,.0f} tok/s | gen {gen_speed:,.0f} tok/s |", flush=True)
    elapsed = time.perf_counter() - begin
    title = (f"seq2seq_quality: {tokens:,} span tokens, {args.ft_steps} fine-tuning steps, "
             f"{args.threads} threads ({'quick' if args.quick else 'full'})")
    note = write_plot(args.out / "seq2seq_quality.png", rows, title)
    record = {
        "command": " ".join(["python", "benchmarks/seq2seq_quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: getattr(args, k) for k in (*FULL, "seed", "threads")},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
        "results": rows, "tried": tried, "elapsed_s": elapsed, "plot": note or "seq2seq_quality.png",
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"# {elapsed:.0f} s; results in {args.out}" + (f"; {note}" if note else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
