#!/usr/bin/env python
"""Which mixer learns most per parameter and per token? Mamba vs Mamba-2 vs hybrid vs attention, one run.

Usage::

    python benchmarks/lm_quality.py --quick                # ~4M params each, 819k tokens each, ~15 min on 2 cores
    python benchmarks/lm_quality.py                        # the same models, 4x the tokens (~1 h)
    python benchmarks/lm_quality.py --families mamba,attention --steps 200
    python benchmarks/lm_quality.py --quick --families mamba,hybrid   # the trained models quantised, too

The question
------------
At an equal parameter count, an equal token budget and the same schedule,
which layer stack reaches the lowest held-out loss? The Mamba paper (Gu & Dao
2023, scaling laws of section 4.2) expects Mamba to match or beat a Llama-style
Transformer ("Transformer++") at equal parameters and tokens from small scale
up, and the Mamba-2 paper (Dao & Gu 2024, its hybrid-model experiments) finds
a few attention layers among Mamba-2 layers to do best. This script measures;
it does not assume either result.

Setup
-----
Four families, each scaled to ``--params`` (default 4M) parameters, the
embedding (tied with the LM head) included:

- ``mamba``: Mamba-1 blocks (d_state 16, expand 2), no MLP, as mamba_ssm's MambaLMHeadModel;
- ``mamba2``: Mamba-2 blocks (d_state 64, headdim 32, expand 2), no MLP;
- ``hybrid``: Mamba-2 blocks with every fourth mixer attention (pattern ``MMMA``), no MLP;
- ``attention``: Llama-style: attention (RoPE, no biases) + SwiGLU MLP (``GatedMLP``,
  hidden ~8/3 d_model) in every block.

Attention layers have 4 heads of d_model / 4. All families start from one width
``d_base`` (that of a Llama-style model with GPT-3's aspect ratio d_model / n_layer = 64
at the target size); each family's depth is then chosen for the target count,
and its width moved in steps of 16 from ``d_base`` only when that brings the
count closer (a 10% change of width costs as much as a 1% miss of the count).
The counts printed before training are exact (counted from the built model).

Every model trains with ``lnlm_ssm.training`` on the same data (the Python
standard library's source by default, ``--data`` for another text), the byte
tokenizer, the same seed (same initialisation stream, same batch order), the
same number of steps, batch and sequence length (so the same tokens), AdamW
with the same peak lr, warmup (10% of the steps) and cosine decay to lr / 10.
Nothing is tuned per family. The default peak lr, 1e-3, came from a short
sweep at 4M params (batch 4 x 256): at 150 steps every family was as good or
better at 1e-3 than at 3e-3 (held-out bpb mamba 2.28 vs 2.32, mamba2 2.33 vs
2.33, hybrid 2.30 vs 2.31, attention 3.22 vs 3.35), and at 1e-2 the SSM
families diverged within 40 steps. Check ``--lr`` before reading a small gap
as a property of the architecture.

Reading the numbers
-------------------
- ``val bpb``: bits per byte of the held-out windows (the corpus's validation
  split, the same fixed windows for every model), at the end of training.
  Lower is better; it is the number to compare. With a byte tokenizer it is
  about the loss in nats / ln 2 (the end-of-file tokens have no byte).
- ``val loss``: the held-out loss in nats per token; ``train loss``: the mean
  training loss in nats per token over the last 10% of the steps. The
  held-out text is other files (the last 5% of the corpus in path order), so
  the two differ by how alike the files are, not only by overfitting.
- Attention-only models sit near the unigram loss (~4 bits per byte) for the
  first tens of steps before they learn to look at the previous bytes; the
  SSM layers' short convolution sees them from the start. At tiny budgets this
  dominates the attention row.
- ``int8 bpb`` and ``bf16 bpb``: the held-out bits per byte of the same trained
  model with its weights quantised by ``lnlm_ssm.quantize_`` (weight-only: int8
  with a scale per output channel, or bf16; activations and math in fp32), on
  the same windows, each with its relative change from the fp32 model
  evaluated the same way (``fp32 bpb``, which repeats ``val bpb``). ``--quantize``
  picks the modes (none: no quantised evaluation).
- ``tok/s``: training throughput, the median of the per-step rates after the
  first 10% of the steps (warm-up; the median also passes over the steps an
  evaluation slowed), ``wall s``: the whole run including evaluations. These depend on the machine and on what else runs on it;
  the quality columns do not (same seed, same data order).
- The models are small and far from converged (``--quick``: 0.2 tokens per
  parameter, where compute-optimal training would use ~20), so the table answers "who learns fastest early", not "who wins
  at scale". A difference smaller than the gap between two seeds (try
  ``--seed``) is noise.

Results go to ``results.json`` and ``loss_curves.png`` (train and held-out loss
of every family on one figure) in ``--out`` (default
``benchmarks/out/lm_quality-<timestamp>/``), with each run's own directory
(metrics.jsonl, final model) under it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

try:
    import lnlm_ssm  # noqa: F401
except ModuleNotFoundError as _exc:  # a checkout that was never `pip install`ed
    if _exc.name != "lnlm_ssm":
        raise
    sys.path.insert(0, str(REPO_ROOT))

from lnlm_ssm import quantize_  # noqa: E402
from lnlm_ssm.layers.quantized import QUANTIZATION_MODES  # noqa: E402
from lnlm_ssm.models import MambaLM, preset  # noqa: E402
from lnlm_ssm.objectives import CausalLMObjective  # noqa: E402
from lnlm_ssm.training.config import TrainConfig  # noqa: E402
from lnlm_ssm.data import WindowSampler, default_corpus_dir, prepare_corpus  # noqa: E402
from lnlm_ssm.training.sweep import train_on_prepared  # noqa: E402
from lnlm_ssm.training.metrics import read_metrics  # noqa: E402
from lnlm_ssm.utils.benchmark import median, name_list, positive_int, torch_threads  # noqa: E402

# --------------------------------------------------------------------------- the four families

WIDTH_STEP = 16  # Mamba-2's headdim 32 needs 2 * d_model % 32 == 0; attention's head_dim d/4 must be even
# How much a change of width counts against a miss of the parameter count (see "Setup").
WIDTH_WEIGHT = 0.1

_MAMBA2_CFG = {"layer": "Mamba2", "d_state": 64, "d_conv": 4, "expand": 2, "headdim": 32, "chunk_size": 64}


def _attn_cfg(d_model: int) -> dict[str, Any]:
    head_dim = d_model // 4
    return {
        "num_heads": 4,
        "head_dim": head_dim,
        "rotary_emb_dim": head_dim,
        "qkv_proj_bias": False,
        "out_proj_bias": False,
    }


def _mlp_width(d_model: int) -> int:
    # Llama's 8/3 d_model, to the 128 multiple GatedMLP would round up to anyway (nearest, not up).
    return max(128, 128 * round(8 * d_model / 3 / 128))


@dataclass(frozen=True)
class Family:
    name: str
    preset: str  # the TrainConfig preset the overrides replace fields of
    period: int  # n_layer is a multiple of this (the layer pattern's length)
    fields: Callable[[int, int], dict[str, Any]]  # (d_model, n_layer) -> MambaLMConfig fields
    about: str


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "mamba",
            "mamba-tiny",
            1,
            lambda d, n: dict(
                d_model=d, n_layer=n, d_intermediate=0, layer_pattern=None,
                ssm_cfg={"layer": "Mamba1", "d_state": 16, "d_conv": 4, "expand": 2},
            ),
            "Mamba-1, no MLP",
        ),
        Family(
            "mamba2",
            "mamba2-tiny",
            1,
            lambda d, n: dict(d_model=d, n_layer=n, d_intermediate=0, layer_pattern=None, ssm_cfg=dict(_MAMBA2_CFG)),
            "Mamba-2, no MLP",
        ),
        Family(
            "hybrid",
            "hybrid-tiny",
            4,
            lambda d, n: dict(
                d_model=d, n_layer=n, d_intermediate=0, layer_pattern="MMMA",
                ssm_cfg=dict(_MAMBA2_CFG), attn_cfg=_attn_cfg(d),
            ),
            "Mamba-2 x3 + attention, no MLP",
        ),
        Family(
            "attention",
            "gpt-tiny",
            1,
            lambda d, n: dict(
                d_model=d, n_layer=n, d_intermediate=_mlp_width(d), layer_pattern="A", attn_cfg=_attn_cfg(d),
            ),
            "Llama-style: attention + SwiGLU MLP",
        ),
    )
}


def count_params(family: Family, d_model: int, n_layer: int) -> int:
    """Parameters of the family's model at this size (tied embedding counted once), built on the meta device."""
    model = MambaLM(preset(family.preset, **family.fields(d_model, n_layer)), device="meta")
    return sum(p.numel() for p in model.parameters())


def base_width(target: int) -> int:
    """d_model of a Llama-style model of ``target`` params (~12 d^2 per layer) with n_layer = d_model / 64."""
    d = (16 * target / 3) ** (1 / 3)
    return max(2 * WIDTH_STEP, WIDTH_STEP * round(d / WIDTH_STEP))


def size_family(family: Family, target: int, d_base: int) -> tuple[int, int, int]:
    """(d_model, n_layer, params) of ``family`` nearest ``target`` parameters at a width near ``d_base``."""
    best = None
    lo = max(2 * WIDTH_STEP, WIDTH_STEP * math.floor(0.75 * d_base / WIDTH_STEP))
    hi = WIDTH_STEP * math.ceil(1.33 * d_base / WIDTH_STEP)
    for d in range(lo, hi + 1, WIDTH_STEP):
        # The count is linear in the number of pattern repeats: measure two and extrapolate.
        one = count_params(family, d, family.period)
        per_repeat = count_params(family, d, 2 * family.period) - one
        fixed = one - per_repeat
        k = max(1, round((target - fixed) / per_repeat))
        for repeats in {max(1, k - 1), k, k + 1}:
            params = fixed + repeats * per_repeat
            cost = abs(params / target - 1) + WIDTH_WEIGHT * abs(math.log(d / d_base))
            if best is None or cost < best[0]:
                best = (cost, d, repeats * family.period, params)
    _, d, n, params = best
    return d, n, params


# --------------------------------------------------------------------------- training and reporting


# Sized on the 2-core machine (shared, load ~1.5): training throughput of the 4M models at batch 8 x 256
# was 3.3k tok/s (mamba, the slowest), 3.6k (mamba2), 3.9k (hybrid), 5.5k (attention), so --quick's 819k
# tokens per model train in 14 min, 15 with the evaluations: a margin of 25% on its 20 min budget.
QUICK = dict(steps=400, batch_size=8, seq_len=256)
FULL = dict(steps=1600, batch_size=8, seq_len=256)


def _tail_mean(values: list[float], fraction: float = 0.1) -> float:
    tail = values[-max(1, math.ceil(fraction * len(values))):]
    return sum(tail) / len(tail)


@torch.no_grad()
def quantized_bpb(model_dir: Path, corpus, args) -> dict[str, float]:
    """Held-out bits per byte of the saved model in fp32 and quantised to each ``--quantize`` mode.

    The windows are those of the training loop's evaluations (``eval_batches``
    depends only on the corpus and the shapes), and the loss is the objective's.
    """
    batches = WindowSampler(
        corpus, "val", seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed
    ).eval_batches(args.eval_batches)
    objective = CausalLMObjective()
    bpb = {}
    for weights in ["fp32", *args.quantize]:
        model = MambaLM.from_pretrained(model_dir).eval()
        if weights != "fp32":
            quantize_(model, weights)
        loss = torch.stack([objective(model, batch).loss.float() for batch in batches]).mean().item()
        bpb[weights] = objective.eval_metrics(loss, corpus.bytes_per_token("val"))["eval_bpb"]
    return bpb


def run_family(family: Family, d_model: int, n_layer: int, args, corpus, out: Path) -> dict[str, Any]:
    config = TrainConfig(
        preset=family.preset,
        model=family.fields(d_model, n_layer),
        data=None if args.data is None else str(args.data),
        tokenizer="byte",
        out=str(out),
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        min_lr=args.lr / 10,
        warmup_steps=max(1, args.steps // 10),
        eval_every=args.eval_every,
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
    bpb = quantized_bpb(out / "model", corpus, args) if args.quantize else {}
    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if r.get("kind") == "train"]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    # Step times include the evaluations and checkpoint saves that preceded them: the median skips those.
    warm = train_rows[len(train_rows) // 10:] or train_rows
    return {
        "model": family.name,
        "about": family.about,
        "params": count_params(family, d_model, n_layer),
        "d_model": d_model,
        "n_layer": n_layer,
        "layers": "".join({"Mamba1": "1", "Mamba2": "2", "Attention": "A"}[t] for t in
                          preset(family.preset, **family.fields(d_model, n_layer)).layer_types()),
        "val_bpb": final["eval_bpb"],
        "val_loss": final["eval_loss"],
        "quantized_bpb": bpb,
        "train_loss": _tail_mean([r["loss"] for r in train_rows]),
        "tokens_per_s": median([r["tokens_per_s"] for r in warm]),
        "tokens": final["tokens"],
        "wall_s": wall,
        "curve": {
            "train": [[r["step"], r["loss"]] for r in train_rows],
            "eval": [[r["step"], r["eval_loss"]] for r in eval_rows],
        },
    }


def write_plot(path: Path, results: list[dict[str, Any]], title: str) -> Optional[str]:
    """Train (thin) and held-out (markers) loss per family on one axis; returns why not when skipped."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        return f"plot skipped: matplotlib not installed ({exc}): pip install matplotlib"
    figure = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, r in enumerate(results):
        color = f"C{i % 10}"
        axes.plot(*zip(*r["curve"]["train"]), color=color, linewidth=0.8, alpha=0.6, label=f"{r['model']} train")
        axes.plot(*zip(*r["curve"]["eval"]), "o-", color=color, markersize=4, label=f"{r['model']} held out")
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats / token; a token is a byte)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    return None




def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"the < 20 min budget on 2 cores: {QUICK}")
    p.add_argument("--steps", type=positive_int, help=f"optimizer steps per model (default {FULL['steps']})")
    p.add_argument("--seq-len", type=positive_int, help=f"tokens per sequence (default {FULL['seq_len']})")
    p.add_argument("--batch-size", type=positive_int, help=f"sequences per step (default {FULL['batch_size']})")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, every family (default 1e-3)")
    p.add_argument("--params", type=positive_int, default=4_000_000, help="target parameter count (default 4M)")
    p.add_argument("--families", type=name_list("--families", FAMILIES), default=list(FAMILIES),
                   help=f"comma list of {list(FAMILIES)}")
    p.add_argument("--data", type=Path, help="a text file or directory (default: the Python stdlib corpus)")
    p.add_argument("--max-bytes", type=positive_int, help="read at most this many bytes of the corpus")
    p.add_argument("--eval-every", type=positive_int, help="steps between held-out evaluations (default steps / 8)")
    p.add_argument("--eval-batches", type=positive_int, default=8, help="held-out batches per evaluation (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--quantize", nargs="*", choices=QUANTIZATION_MODES, default=list(QUANTIZATION_MODES),
                   help="evaluate the trained models quantised to these modes too (default: int8 bf16; none: skip)")
    p.add_argument("--out", type=Path, help="default benchmarks/out/lm_quality-<timestamp>/")
    args = p.parse_args(argv)
    if not args.lr > 0:
        p.error(f"--lr must be > 0; got {args.lr}")
    sizes = QUICK if args.quick else FULL
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.eval_every = args.eval_every or max(1, args.steps // 8)
    args.out = args.out or HERE / "out" / f"lm_quality-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    taken = [name for name in args.families if (args.out / name).exists()]
    if taken:
        p.error(f"--out {args.out} already holds runs of {taken}: choose another directory")
    args.out.mkdir(parents=True, exist_ok=True)

    d_base = base_width(args.params)
    plan = []
    for name in args.families:
        d, n, params = size_family(FAMILIES[name], args.params, d_base)
        plan.append((FAMILIES[name], d, n, params))
    tokens = args.steps * args.batch_size * args.seq_len
    print(
        f"# {args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} tokens per model, lr {args.lr:g}, "
        f"seed {args.seed}, {args.threads} threads, torch {torch.__version__}"
    )
    print(f"# target {args.params:,} params, d_base {d_base}")
    for family, d, n, params in plan:
        print(f"#   {family.name:<10} d_model {d:>4} n_layer {n:>3}  {params:>10,} params "
              f"({100 * (params / args.params - 1):+.1f}%)  {family.about}")

    source = default_corpus_dir() if args.data is None else args.data
    corpus_dir = args.out / "data"
    corpus = prepare_corpus(source, corpus_dir, tokenizer="byte", max_bytes=args.max_bytes)
    print(f"# data: {source}: {corpus.n_tokens('train'):,} train / {corpus.n_tokens('val'):,} held-out tokens "
          f"(the held-out windows: {args.eval_batches} x {args.batch_size} x {args.seq_len}, the same for every model)")

    results = []
    with torch_threads(args.threads):
        for family, d, n, _ in plan:
            print(f"training {family.name} ...", flush=True)
            results.append(run_family(family, d, n, args, corpus, args.out / family.name))

    header = (f"{'model':<10} {'params':>10} {'layers':<14} {'val bpb':>8} {'val loss':>8} {'train loss':>10} "
              f"{'tok/s':>8} {'wall s':>7}")
    print("\n" + header)
    for r in results:
        print(
            f"{r['model']:<10} {r['params']:>10,} {r['layers']:<14} {r['val_bpb']:>8.4f} {r['val_loss']:>8.4f} "
            f"{r['train_loss']:>10.4f} {r['tokens_per_s']:>8.0f} {r['wall_s']:>7.1f}"
        )
    if args.quantize:
        print("\n" + f"{'model':<10} {'fp32 bpb':>8}" + "".join(f" {m + ' bpb':>8} {'change':>8}" for m in args.quantize))
        for r in results:
            bpb = r["quantized_bpb"]
            print(f"{r['model']:<10} {bpb['fp32']:>8.4f}"
                  + "".join(f" {bpb[m]:>8.4f} {bpb[m] / bpb['fp32'] - 1:>+8.3%}" for m in args.quantize))
    title = (f"{args.params / 1e6:g}M params, {tokens:,} tokens, lr {args.lr:g}, seed {args.seed} "
             f"({platform.machine()}, {args.threads} threads)")
    shutil.rmtree(corpus_dir)  # the tokenised corpus: rebuilt in a second from the source
    note = write_plot(args.out / "loss_curves.png", results, title)
    with open(args.out / "results.json", "w") as f:
        json.dump(
            {
                "benchmark": "lm_quality",
                "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "machine": {"platform": platform.platform(), "processor": platform.processor(),
                            "threads": args.threads, "torch": torch.__version__},
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "tokens_per_model": tokens,
                "rows": results,
            },
            f,
            indent=2,
        )
    if note:
        print(note)
    print(f"\nwrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
