#!/usr/bin/env python
"""Encoders side by side: attention (BERT), BiMamba, Hydra, ALBERT and ELECTRA, in one run.

Usage::

    python benchmarks/encoder_quality.py --quick      # CI's smoke run: a few steps, short sequences (~2 min)
    python benchmarks/encoder_quality.py              # the run of record (<= 20 min on 2 cores)

Three questions, each answered by measurement in the same run:

1. **Quality.** At (about) equal parameters, tokens and schedule, which encoder
   reaches the lowest held-out masked-token loss? Every family trains with
   ``lnlm_ssm.training`` on the same data (the Python standard library's source
   by default), the byte tokenizer, the same seed, steps, batch and sequence
   length, AdamW with warmup (10% of the steps) and cosine decay to lr / 10,
   with the MLM objective (15% of tokens, 80/10/10, fresh masks every batch:
   RoBERTa's recipe; no next-sentence task). ELECTRA trains with its own
   objective. Every family gets the same tuning budget: each ``--lrs`` value,
   and the table keeps each family's best (the lr is printed). Families:

   - ``bert``: post-norm attention blocks with LayerNorm, biases and a GELU MLP
     (the ``bert-tiny`` architecture), learned positions;
   - ``bimamba``: the same blocks with BiMamba (Mamba-2 both ways, in/out
     projections tied, as Caduceus) in place of attention, pre-norm, no position table;
   - ``hydra``: the same with Hydra (quasiseparable Mamba-2);
   - ``albert``: one attention block shared by all layers, factorised embedding
     (ALBERT's two savings; its parameter count cannot be matched by depth);
   - ``electra``: the ``bert`` discriminator trained by replaced-token detection
     against a generator of 1/4 its width (the generator's MLM loss is in the
     row; the discriminator's loss and accuracy get their own columns, since its
     task is not MLM). Its row's ``params`` counts both.

   Reported: held-out masked-token loss (nats) and accuracy, on the same fixed
   held-out windows and masks for every family; training tokens/s (median over
   the steps after the first 10%).

2. **Long sequences.** Encoder forward throughput (tokens/s, batch 1, inference)
   against sequence length for the ``bert-110m``, ``bimamba-110m`` and
   ``hydra-110m`` presets (about 110M parameters each; BERT's position table
   stretched to the longest length). Target: Hydra and BiMamba beat attention from
   4096 up.

3. **Against HF.** HF transformers' ``BertForMaskedLM`` and ours on the same
   weights (a random ``bert-base``-sized model, saved by HF and read by
   ``lnlm_ssm.from_pretrained``), forward time at BERT's shapes. Target: ours
   no slower.

Results go to ``results.json`` and ``encoder_quality.png`` under ``--out``.
The models are small and far from converged: the table says who learns fastest
early at this size, not who wins at scale; a gap smaller than the one between
two seeds (``--seed``) is noise.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

try:
    import lnlm_ssm  # noqa: F401
except ModuleNotFoundError as _exc:  # a checkout that was never `pip install`ed
    if _exc.name != "lnlm_ssm":
        raise
    sys.path.insert(0, str(REPO_ROOT))

from lnlm_ssm.data import default_corpus_dir, prepare_corpus  # noqa: E402
from lnlm_ssm.models import MaskedLM, from_pretrained, preset, preset_architecture  # noqa: E402
from lnlm_ssm.training.config import TrainConfig  # noqa: E402
from lnlm_ssm.training.sweep import train_on_prepared  # noqa: E402
from lnlm_ssm.training.metrics import read_metrics  # noqa: E402
from lnlm_ssm.utils.benchmark import (  # noqa: E402
    learning_rate, median, name_list, positive_int, time_fn, torch_threads,
)


@dataclass(frozen=True)
class Family:
    name: str
    preset: str
    objective: str
    model: dict[str, Any]
    about: str


# Depths that bring every family near bert's 1.11M parameters (ALBERT's are set by its shared block).
FAMILIES = {
    f.name: f
    for f in (
        Family("bert", "bert-tiny", "mlm", {"n_layer": 5}, "attention, post-norm (BERT/RoBERTa recipe)"),
        Family("bimamba", "bimamba-tiny", "mlm", {"n_layer": 4}, "BiMamba (Mamba-2, tied in/out), pre-norm"),
        Family("hydra", "hydra-tiny", "mlm", {"n_layer": 4}, "Hydra (quasiseparable Mamba-2), pre-norm"),
        Family("albert", "albert-tiny", "mlm", {"embedding_size": 128}, "ALBERT: 1 shared block x 6, E=128"),
        Family(
            "electra", "electra-tiny", "electra", {"discriminator": {"n_layer": 5}},
            "ELECTRA: bert discriminator + 1/4-width generator",
        ),
    )
}

QUICK = dict(steps=12, batch_size=4, seq_len=64, eval_batches=2, lrs=[1e-3], seqlens=[256, 512], repeats=1,
             speed_preset_layers=2, hf_batch=1, hf_seq_len=128)
FULL = dict(steps=120, batch_size=8, seq_len=128, eval_batches=8, lrs=[1e-3, 3e-3],
            seqlens=[512, 1024, 2048, 4096, 8192], repeats=2, speed_preset_layers=None, hf_batch=1, hf_seq_len=512)


def seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` after one untimed call."""
    return median(time_fn(fn, warmup=1, repeats=repeats, device="cpu"))


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (a shared or tied tensor counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def family_params(family: Family, vocab_size: int) -> int:
    entry = preset_architecture(family.preset)
    config = preset(family.preset, **_model_fields(family, vocab_size))
    return count_params(entry.model_class(config, device="meta"))


def _model_fields(family: Family, vocab_size: int) -> dict[str, Any]:
    if family.objective == "electra":
        discriminator = {**preset(family.preset).discriminator.to_dict(), **family.model["discriminator"]}
        return {"discriminator": discriminator, "vocab_size": vocab_size}
    return {**family.model, "vocab_size": vocab_size}


def run_family(family: Family, lr: float, args, corpus, out: Path) -> dict[str, Any]:
    config = TrainConfig(
        preset=family.preset,
        objective=family.objective,
        model=_model_fields(family, corpus.vocab_size),
        data=None if args.data is None else str(args.data),
        tokenizer="byte",
        out=str(out),
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=max(1, args.steps // 10),
        eval_every=args.steps,
        eval_batches=args.eval_batches,
        log_every=1,
        ckpt_every=args.steps,
        keep_last=1,
        seed=args.seed,
        max_bytes=args.max_bytes,
        device="cpu",
        dtype="fp32",
    )
    final, wall = train_on_prepared(config, corpus.directory)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "train"]
    warm = rows[len(rows) // 10:] or rows
    electra = family.objective == "electra"
    return {
        "model": family.name,
        "about": family.about,
        "lr": lr,
        "params": family_params(family, corpus.vocab_size),
        # ELECTRA's masked-token figures are its generator's; its own task is the discriminator's.
        "val_loss": final["eval_gen_loss" if electra else "eval_loss"],
        "val_accuracy": final["eval_gen_accuracy" if electra else "eval_accuracy"],
        "disc_loss": final.get("eval_disc_loss"),
        "disc_accuracy": final.get("eval_disc_accuracy"),
        "tokens_per_s": median([r["tokens_per_s"] for r in warm]),
        "tokens": final["tokens"],
        "wall_s": wall,
        "curve": [[r["step"], r["loss"]] for r in rows],
    }


@torch.inference_mode()
def forward_throughput(args) -> list[dict[str, Any]]:
    """Tokens/s of one forward (batch 1) of each 110m encoder at each ``--seqlens`` length."""
    longest = max(args.seqlens)
    rows = []
    for name in ("bert-110m", "bimamba-110m", "hydra-110m"):
        fields = {"hidden_dropout": 0.0}
        if name == "bert-110m":
            fields["max_position_embeddings"] = longest  # BERT's table stretched; its values don't matter for speed
        if args.speed_preset_layers:
            fields["n_layer"] = args.speed_preset_layers
        model = MaskedLM(preset(name, **fields)).eval()
        params = count_params(model)
        for seqlen in args.seqlens:
            ids = torch.randint(0, 30000, (1, seqlen))
            took = seconds(lambda: model(ids), args.repeats)
            rows.append({"model": name, "params": params, "seqlen": seqlen, "seconds": took,
                         "tokens_per_s": seqlen / took})
            print(f"#   {name:<13} seqlen {seqlen:>5}: {took * 1e3:9.1f} ms  {seqlen / took:9.0f} tok/s", flush=True)
    return rows


@torch.inference_mode()
def against_hf(args) -> Optional[dict[str, Any]]:
    """HF BertForMaskedLM and ours on the same (random, bert-base-sized) weights: forward seconds."""
    try:
        from transformers import BertConfig, BertForMaskedLM
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        print(f"# HF comparison skipped: transformers is not installed ({exc})")
        return None
    hf_logging.disable_progress_bar()
    layers = args.speed_preset_layers or 12
    torch.manual_seed(args.seed)
    hf = BertForMaskedLM(BertConfig(num_hidden_layers=layers, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = from_pretrained(tmp).eval()
    ids = torch.randint(0, 30000, (args.hf_batch, args.hf_seq_len))
    mask = torch.ones_like(ids)
    # Alternated, so that both see the same machine: the medians of their own runs are compared.
    hf_times, ours_times = [], []
    for _ in range(max(3, args.repeats)):
        hf_times.append(seconds(lambda: hf(input_ids=ids, attention_mask=mask), 1))
        ours_times.append(seconds(lambda: ours(ids, attention_mask=mask), 1))
    hf_s, ours_s = median(hf_times), median(ours_times)
    err = ((ours(ids, attention_mask=mask).logits - hf(input_ids=ids, attention_mask=mask).logits).abs().max()).item()
    return {"layers": layers, "batch": args.hf_batch, "seq_len": args.hf_seq_len, "hf_s": hf_s, "ours_s": ours_s,
            "speedup": hf_s / ours_s, "max_abs_logit_diff": err}


def write_plot(path: Path, results: list[dict], speed: list[dict], title: str) -> Optional[str]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        return f"plot skipped: matplotlib not installed ({exc})"
    figure = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for i, r in enumerate(results):
        left.plot(*zip(*r["curve"]), color=f"C{i}", linewidth=0.9, label=f"{r['model']} (lr {r['lr']:g})")
    left.set_xlabel("step")
    left.set_ylabel("training loss (nats; ELECTRA: gen + 50 disc)")
    left.set_yscale("log")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for i, name in enumerate(dict.fromkeys(r["model"] for r in speed)):
        rows = [r for r in speed if r["model"] == name]
        right.plot([r["seqlen"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", color=f"C{i}", label=name)
    right.set_xscale("log", base=2)
    right.set_xlabel("sequence length")
    right.set_ylabel("forward tokens/s (batch 1)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return None





def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"CI's smoke run: {QUICK}")
    p.add_argument("--steps", type=positive_int, help=f"optimizer steps per model (default {FULL['steps']})")
    p.add_argument("--batch-size", type=positive_int, help=f"sequences per step (default {FULL['batch_size']})")
    p.add_argument("--seq-len", type=positive_int, help=f"tokens per training sequence (default {FULL['seq_len']})")
    p.add_argument("--lrs", type=learning_rate, nargs="+",
                   help=f"peak learning rates every family tries (default {FULL['lrs']})")
    p.add_argument("--families", type=name_list("--families", FAMILIES), default=list(FAMILIES),
                   help=f"comma list of {list(FAMILIES)}")
    p.add_argument("--seqlens", type=positive_int, nargs="+", help=f"forward lengths (default {FULL['seqlens']})")
    p.add_argument("--skip-speed", action="store_true", help="train only: no throughput or HF comparison")
    p.add_argument("--data", type=Path, help="a text file or directory (default: the Python stdlib corpus)")
    p.add_argument("--max-bytes", type=positive_int, help="read at most this many bytes of the corpus")
    p.add_argument("--eval-batches", type=positive_int, help="held-out batches at the end of training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--out", type=Path, help="default benchmarks/out/encoder_quality-<timestamp>/")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for name, value in sizes.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.quick and args.max_bytes is None:
        args.max_bytes = 2_000_000
    args.out = args.out or HERE / "out" / f"encoder_quality-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} is not empty: choose another directory")
    args.out.mkdir(parents=True, exist_ok=True)

    tokens = args.steps * args.batch_size * args.seq_len
    print(f"# {args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} tokens per model, lrs "
          f"{args.lrs} (each family's best kept), seed {args.seed}, {args.threads} threads, torch {torch.__version__}")
    source = default_corpus_dir() if args.data is None else args.data
    corpus = prepare_corpus(source, args.out / "data", tokenizer="byte", max_bytes=args.max_bytes)
    for name in args.families:
        family = FAMILIES[name]
        print(f"#   {name:<8} {family_params(family, corpus.vocab_size):>10,} params  {family.about}")

    results, tried = [], []
    speed: list[dict[str, Any]] = []
    hf = None
    with torch_threads(args.threads):
        for name in args.families:
            runs = []
            for lr in args.lrs:
                run = run_family(FAMILIES[name], lr, args, corpus, args.out / "runs" / f"{name}-lr{lr:g}")
                print(f"#   {name:<8} lr {lr:<7g} held-out loss {run['val_loss']:.4f}  accuracy "
                      f"{run['val_accuracy']:.3f}  {run['tokens_per_s']:,.0f} tok/s", flush=True)
                runs.append(run)
            tried.extend(runs)
            # Best by held-out masked-token loss, except ELECTRA: by its own (discriminator) loss.
            key = "disc_loss" if FAMILIES[name].objective == "electra" else "val_loss"
            results.append(min(runs, key=lambda r: r[key] if math.isfinite(r[key]) else math.inf))
        if not args.skip_speed:
            print("# forward throughput, batch 1, inference:")
            speed = forward_throughput(args)
            hf = against_hf(args)

    print()
    print(f"{'model':<9} {'params':>10} {'lr':>7} {'MLM loss':>9} {'MLM acc':>8} {'disc loss':>10} "
          f"{'disc acc':>9} {'train tok/s':>12}")
    for r in results:
        disc = (f"{r['disc_loss']:>10.4f} {r['disc_accuracy']:>9.3f}" if r["disc_loss"] is not None
                else f"{'-':>10} {'-':>9}")
        print(f"{r['model']:<9} {r['params']:>10,} {r['lr']:>7g} {r['val_loss']:>9.4f} {r['val_accuracy']:>8.3f} "
              f"{disc} {r['tokens_per_s']:>12,.0f}")
    if speed:
        print()
        names = list(dict.fromkeys(r["model"] for r in speed))
        print(f"{'seqlen':>7} " + " ".join(f"{n:>14}" for n in names) + "   (forward tokens/s, batch 1)")
        for seqlen in args.seqlens:
            cells = [next(r for r in speed if r["model"] == n and r["seqlen"] == seqlen)["tokens_per_s"]
                     for n in names]
            print(f"{seqlen:>7} " + " ".join(f"{c:>14,.0f}" for c in cells))
    if hf is not None:
        print()
        print(f"HF BertForMaskedLM vs ours, same weights ({hf['layers']} layers, batch {hf['batch']} x "
              f"{hf['seq_len']}): HF {hf['hf_s'] * 1e3:.1f} ms, ours {hf['ours_s'] * 1e3:.1f} ms, "
              f"ours {hf['speedup']:.2f}x HF's speed; max |logit diff| {hf['max_abs_logit_diff']:.2e}")

    shutil.rmtree(args.out / "data", ignore_errors=True)
    record = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "torch": torch.__version__,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "tried": tried,
        "forward_throughput": speed,
        "against_hf": hf,
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    why_not = write_plot(args.out / "encoder_quality.png", results, speed,
                         f"encoders, {tokens:,} tokens each, {args.threads} threads")
    print(f"\n# results: {args.out / 'results.json'}" + (f"; {why_not}" if why_not else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
