#!/usr/bin/env python
"""Which pretrained stack fine-tunes best? Mamba vs hybrid vs attention on three tasks built from the stdlib.

Usage::

    python benchmarks/finetune_quality.py --quick     # CI smoke run: tiny models, 20 steps (7 min, shared 2 cores)
    python benchmarks/finetune_quality.py             # ~1M-parameter models, 150 + 4 x 200 steps per family (~15 min)
    python benchmarks/finetune_quality.py --families mamba --tasks classify --d-model 64 --n-layer 2 \
        --pretrain-steps 150 --steps 150              # the pooling comparison (17 min on a shared 2-core machine)

``--quick`` checks that every stage runs; at 20 steps its classification stays at
chance. The pooling comparison above gave held-out accuracy 0.304 (mean) and 0.183
(last), chance 0.167 (2026-12-03).

Setup
-----
Each family (the ``mamba-tiny``, ``hybrid-tiny`` and ``gpt-tiny`` presets, about 1M
parameters each; ``--quick``: d_model 64, 2 layers) is pretrained with the causal LM
objective on the Python standard library's source for the same steps, batch and
sequence length, then fine-tuned through ``lnlm_ssm.training`` (the same code as
``lnlm-ssm train --objective ... --init-from``) on three tasks. Every task is split
by source file: no held-out row comes from a file a training row came from.

- ``classify``: which package a 200-character snippet of stdlib source comes from
  (email, asyncio, xml, unittest, multiprocessing, importlib), balanced classes;
  chance is 1/6. Run with ``mean`` and with ``last`` pooling (the default is the
  better one).
- ``tag``: the ``tokenize`` type of every byte of a source line (NAME, OP, NUMBER,
  STRING, COMMENT, or OTHER for whitespace and the rest); accuracy over bytes.
- ``prefer``: DPO on ``{"prompt": a line's first half, "chosen": its real second
  half, "rejected": the second half of another line}``; held-out reward accuracy
  (chance 0.5).

Time: the default run is sized for ~15 minutes on 2 quiet cores. Measured on
2026-12-03 (a loaded 2-core machine, so as CPU time of one torch thread, which
contention does not inflate): a training step of 16 x 128 tokens takes 0.48 s
(mamba-tiny), 0.33 s (hybrid-tiny), 0.26 s (gpt-tiny), and one of 12 x 202 (a
classification batch) 0.58, 0.42 and 0.33 s. Per family that makes 150 pre-training
steps, 2 x 200 classification steps, 200 tagging steps (rows up to 80 bytes) and 200
DPO steps (~1.6k token-equivalents each, with the reference) plus the evaluations:
~7 min (mamba), ~5 (hybrid) and ~4 (attention) on one thread, ~17.5 in all with the
data, so ~12-13 on two threads. Fine-tuning batches were 16 rows before (~22 min on
one thread); the partial run ``--families mamba --pretrain-steps 10 --steps 10``
took 1030 s on the loaded machine, which says nothing of a quiet one.

Reported per family: held-out accuracy of each task and the fine-tuning throughput
(tokens/s, median of the logged steps after the first 10%). Results: ``results.json``
in ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import random
import shutil
import sys
import time
import tokenize
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("lnlm_ssm") is None:  # a checkout that was never `pip install`ed
    sys.path.insert(0, str(HERE.parent))

from lnlm_ssm.data.corpus import default_corpus_dir  # noqa: E402
from lnlm_ssm.training.config import TrainConfig  # noqa: E402
from lnlm_ssm.training.loop import train  # noqa: E402
from lnlm_ssm.training.metrics import read_metrics  # noqa: E402
from lnlm_ssm.utils.benchmark import median  # noqa: E402

PACKAGES = ("email", "asyncio", "xml", "unittest", "multiprocessing", "importlib")
FAMILIES = {"mamba": "mamba-tiny", "hybrid": "hybrid-tiny", "attention": "gpt-tiny"}
TASKS = ("classify", "tag", "prefer")
TAGS = {tokenize.NAME: "NAME", tokenize.OP: "OP", tokenize.NUMBER: "NUMBER", tokenize.STRING: "STRING",
        tokenize.COMMENT: "COMMENT"}
SNIPPET = 200


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Every fifth file (in path order) is held out."""
    files = sorted(files)
    return [f for i, f in enumerate(files) if i % 5], [f for i, f in enumerate(files) if i % 5 == 0]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def package_files(stdlib: Path) -> dict[str, tuple[list[Path], list[Path]]]:
    out = {}
    for pkg in PACKAGES:
        files = [f for f in (stdlib / pkg).rglob("*.py") if "test" not in f.parts and f.stat().st_size > 4 * SNIPPET]
        out[pkg] = split_files(files)
    return out


def classify_rows(files: dict, split: int, per_class: int, rng: random.Random) -> list[dict]:
    rows = []
    for pkg, parts in files.items():
        texts = [read(f) for f in parts[split]]
        for _ in range(per_class):
            text = rng.choice(texts)
            start = text.rfind("\n", 0, rng.randrange(len(text) - SNIPPET)) + 1
            rows.append({"text": text[start : start + SNIPPET], "label": pkg})
    rng.shuffle(rows)
    return rows


def tag_line_rows(path: Path) -> list[dict]:
    """One row per source line whose tokens all lie on it: pieces (tokens and the gaps) and their tags."""
    text = read(path)
    lines = text.splitlines(keepends=True)
    by_line: dict[int, list] = {}
    spanning = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            (r0, c0), (r1, c1) = tok.start, tok.end
            if r0 != r1:
                spanning.update(range(r0, r1 + 1))
            elif tok.type in TAGS:
                by_line.setdefault(r0, []).append((c0, c1, TAGS[tok.type]))
    except (tokenize.TokenError, SyntaxError):
        return []
    rows = []
    for r, toks in by_line.items():
        line = lines[r - 1].rstrip("\n")
        if r in spanning or not line.strip() or len(line) > 80:
            continue
        pieces, labels, pos = [], [], 0
        for c0, c1, tag in toks:
            if c0 > pos:
                pieces.append(line[pos:c0])
                labels.append("OTHER")
            pieces.append(line[c0:c1])
            labels.append(tag)
            pos = c1
        if pos < len(line):
            pieces.append(line[pos:])
            labels.append("OTHER")
        rows.append({"tokens": pieces, "labels": labels})
    return rows


def preference_rows(files: list[Path], n: int, rng: random.Random) -> list[dict]:
    lines = [ln.strip() for f in files for ln in read(f).splitlines() if 24 <= len(ln.strip()) <= 80]
    rows = []
    for _ in range(n):
        line, other = rng.sample(lines, 2)
        cut, other_cut = len(line) // 2, len(other) // 2
        if line[cut:] != other[other_cut:]:
            rows.append({"prompt": line[:cut], "chosen": line[cut:], "rejected": other[other_cut:]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tasks(out: Path, sizes: dict[str, int], seed: int) -> dict[str, tuple[Path, Path]]:
    rng = random.Random(seed)
    stdlib = default_corpus_dir()
    files = package_files(stdlib)
    train_files = [f for parts in files.values() for f in parts[0]]
    eval_files = [f for parts in files.values() for f in parts[1]]
    tasks = {}
    n = sizes["classify"]
    tasks["classify"] = (write_jsonl(out / "classify-train.jsonl", classify_rows(files, 0, n, rng)),
                         write_jsonl(out / "classify-eval.jsonl", classify_rows(files, 1, max(8, n // 4), rng)))
    tag_train = [r for f in train_files for r in tag_line_rows(f)]
    tag_eval = [r for f in eval_files for r in tag_line_rows(f)]
    tasks["tag"] = (write_jsonl(out / "tag-train.jsonl", rng.sample(tag_train, sizes["tag"])),
                    write_jsonl(out / "tag-eval.jsonl", rng.sample(tag_eval, max(16, sizes["tag"] // 4))))
    n = sizes["prefer"]
    tasks["prefer"] = (write_jsonl(out / "prefer-train.jsonl", preference_rows(train_files, n, rng)),
                       write_jsonl(out / "prefer-eval.jsonl", preference_rows(eval_files, max(16, n // 4), rng)))
    return tasks


def run(config: TrainConfig) -> tuple[dict[str, Any], float]:
    final = train(config)
    rows = [r for r in read_metrics(Path(config.out) / "metrics.jsonl") if r.get("kind") == "train"]
    warm = rows[len(rows) // 10 :] or rows
    shutil.rmtree(Path(config.out) / "checkpoints", ignore_errors=True)
    return final, median([r["tokens_per_s"] for r in warm])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and budgets (CI)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {list(FAMILIES)}")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {list(TASKS)}")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default 150 (--quick: 30)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per task (default 200, --quick 20)")
    parser.add_argument("--d-model", type=int, default=None, help="replace the presets' width (--quick: 64)")
    parser.add_argument("--n-layer", type=int, default=None, help="replace the presets' depth (--quick: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/out/finetune_quality-<time>)")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    tasks_run = [t for t in args.tasks.split(",") if t]
    for flag, given, known in (("--families", families, FAMILIES), ("--tasks", tasks_run, TASKS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {list(known)}")
    out = Path(args.out or HERE / "out" / f"finetune_quality-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        model = {"d_model": 64, "n_layer": 2}
        pre = dict(steps=30, batch_size=8, seq_len=128, max_bytes=2_000_000)
        tune_steps, tune_batch, sizes = 20, 8, {"classify": 32, "tag": 160, "prefer": 160}
    else:
        model = {}
        pre = dict(steps=150, batch_size=16, seq_len=128, max_bytes=20_000_000)
        # Sized to take ~15 minutes on 2 quiet cores (see the module docstring).
        tune_steps, tune_batch, sizes = 200, 12, {"classify": 400, "tag": 3200, "prefer": 3200}
    for name, value in (("d_model", args.d_model), ("n_layer", args.n_layer)):
        if value is not None:
            model[name] = value
    pre["steps"] = args.pretrain_steps or pre["steps"]
    tune_steps = args.steps or tune_steps
    tasks = build_tasks(out, sizes, args.seed)
    common = dict(device="cpu", dtype="fp32", seed=args.seed, log_every=1, keep_last=1)
    results = []
    for family in families:
        preset_name = FAMILIES[family]
        if preset_name == "hybrid-tiny" and model.get("n_layer", 8) < 4:
            fields = {**model, "layer_pattern": "MA"}  # keep one attention layer in the small stack
        else:
            fields = dict(model)
        started = time.perf_counter()
        base, _ = run(TrainConfig(preset=preset_name, model=fields, out=str(out / family / "pretrain"), lr=3e-3,
                                  min_lr=3e-4, warmup_steps=pre["steps"] // 10, eval_every=pre["steps"],
                                  ckpt_every=pre["steps"], **pre, **common))
        init = str(out / family / "pretrain" / "model")
        row: dict[str, Any] = {"family": family, "preset": preset_name, "pretrain_eval_bpb": base["eval_bpb"]}
        tune = dict(init_from=init, steps=tune_steps, lr=1e-3, min_lr=1e-4, warmup_steps=tune_steps // 10,
                    eval_every=tune_steps, ckpt_every=tune_steps, batch_size=tune_batch, seq_len=256, eval_batches=64,
                    **common)
        for pooling in ("mean", "last") if "classify" in tasks_run else ():
            final, speed = run(TrainConfig(objective="classify", data=str(tasks["classify"][0]),
                                           eval_data=str(tasks["classify"][1]), model={"pooling": pooling},
                                           out=str(out / family / f"classify-{pooling}"), **tune))
            row[f"classify_{pooling}_acc"] = final["eval_accuracy"]
            row[f"classify_{pooling}_tok_s"] = speed
        if "tag" in tasks_run:
            final, speed = run(TrainConfig(objective="token-classify", data=str(tasks["tag"][0]),
                                           eval_data=str(tasks["tag"][1]), out=str(out / family / "tag"), **tune))
            row["tag_acc"], row["tag_tok_s"] = final["eval_accuracy"], speed
        if "prefer" in tasks_run:
            final, speed = run(TrainConfig(objective="dpo", data=str(tasks["prefer"][0]),
                                           eval_data=str(tasks["prefer"][1]), out=str(out / family / "prefer"),
                                           **tune))
            row["prefer_reward_acc"], row["prefer_tok_s"] = final["eval_reward_accuracy"], speed
        row["wall_s"] = time.perf_counter() - started
        results.append(row)
        print(json.dumps(row))
    settings = dict(quick=args.quick, model=model, pretrain=pre, tune_steps=tune_steps, tune_batch=tune_batch,
                    sizes=sizes, seed=args.seed)
    (out / "results.json").write_text(json.dumps({"settings": settings, "rows": results}, indent=2) + "\n")
    columns = [c for c in ("classify_mean_acc", "classify_last_acc", "tag_acc", "prefer_reward_acc",
                           "classify_mean_tok_s", "tag_tok_s", "prefer_tok_s") if c in results[0]]
    print("\n" + f"{'family':10s}" + "".join(f"{c:>22s}" for c in columns))
    for r in results:
        print(f"{r['family']:10s}" + "".join(f"{r[c]:22.3f}" for c in columns))
    print(f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
