#!/usr/bin/env python
"""Whole-model speed: MambaLM beside HF transformers on identical weights, and beside the roofline.

Usage::

    python benchmarks/model_speed.py              # mamba-130m, mamba2-130m, hybrid-130m; fp32, 2 threads, CPU
    python benchmarks/model_speed.py --presets mamba-130m --repeats 5
    python benchmarks/model_speed.py --quick      # tiny models, a few tokens (the CI test)
    python benchmarks/model_speed.py --presets mamba-130m --decode-batch 1 --quantize int8 bf16

For each preset it measures, each a median over ``--repeats`` runs after a warm-up:

- prefill: one forward over ``--prefill`` tokens (batch 1, all logits, no grad) -> tokens/s;
- decode, at each ``--decode-batch``: ``--new-tokens`` greedy tokens after a 16-token
  prompt, through each library's ``generate`` and cache; the time of a
  1-new-token generate (prefill and first sample) is subtracted -> new tokens/s.
  Ours twice: ``decode_b<n>`` is ``generate``'s default (on the CPU the fused step,
  one C++ call per block, where the model has one), ``decode_b<n>_unfused`` the
  op-by-op forward (``fused_step=False``), both beside HF's decode;
- training: forward + backward with the LM loss on a ``--train-batch`` x
  ``--train-seqlen`` batch (no optimizer step) -> tokens/s;
- for the presets of ``--quantize-presets`` (default mamba-130m), decode again
  with the model's weights quantised (``lnlm_ssm.quantize_``) to each mode of
  ``--quantize`` (default int8 and bf16), beside HF's fp32 decode and the
  quantised model's own bound (its weight bytes are fewer).

The HF twin is built from the preset's config (``MambaForCausalLM`` for Mamba-1,
``Mamba2ForCausalLM`` for Mamba-2; HF has no class for the hybrid layout), saved,
and read back by ``MambaLM.from_pretrained``: both hold the same weights, and
their logits are compared before anything is timed. A run that takes longer
than ``--slow-s`` is measured once, its warm-up skipped (HF's training on CPU).

Where a batch-1 fused decode step spends its time (fp32, and each ``--quantize``
mode): the step is re-run with its
parts timed inside its one C++ call (embedding, each block, final norm) and the LM
head after it (the same kernels in the same order as ``generate``, so every weight
comes from memory), and each part's median is set beside its weight bytes at copy
bandwidth, "streamed", the rest being everything else (elementwise work, glue,
dispatch). The op-by-op forward's blocks are timed around each block's forward,
in a loop of their own after the fused steps.
Printed per preset and kept in the JSON (``breakdown``), per layer; what the parts'
medians leave of the whole step's median is "unattributed" (the calls between the
parts, and the odd slow part of a token, which a part's median drops).

Rooflines: decode at most ``batch * bandwidth / weight bytes`` tokens/s (every
weight read once per step), with the copy bandwidth measured between the decode
row's own runs (on a shared machine it drifts by 10-20% over minutes; the
breakdown measures it again just before); prefill and training at most
``peak / 2N`` and ``peak / 6N`` (N parameters, fp32 matmul peak measured just
before each preset). Results go to ``results.json`` and ``model_speed.png`` (each
measure as a fraction of its roofline) in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from lnlm_ssm import MambaLM, quantize_
from lnlm_ssm.layers.block_step import FusedStepUnsupported, decode_step
from lnlm_ssm.layers.quantized import QUANTIZATION_MODES
from lnlm_ssm.models import preset
from lnlm_ssm.models.heads import lm_logits
from lnlm_ssm.utils.benchmark import measure_copy_bandwidth, measure_matmul_peak, median, tensor_bytes, torch_threads

HERE = Path(__file__).resolve().parent
PRESETS = ["mamba-130m", "mamba2-130m", "hybrid-130m"]
PROMPT = 16
QUICK = dict(d_model=64, n_layer=4, vocab_size=304, attn_cfg={"num_heads": 2, "head_dim": 32, "rotary_emb_dim": 32})


def timed(fn: Callable[[], object], repeats: int, slow_s: float) -> tuple[float, int]:
    """(median seconds, runs measured); a warm-up slower than ``slow_s`` is itself the one measurement."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > slow_s:
        return first, 1
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times), repeats


def hf_config(model: MambaLM):
    """The HF transformers config of ``model``'s architecture, or None when HF has no class for it."""
    import transformers

    cfg, types = model.config, set(model.config.layer_types())
    mixer = model.backbone.layers[0].mixer
    common = dict(
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        state_size=mixer.d_state,
        conv_kernel=mixer.d_conv,
        expand=mixer.expand,
        layer_norm_epsilon=cfg.norm_epsilon,
        residual_in_fp32=cfg.residual_in_fp32,
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=0,
    )
    if types == {"Mamba1"} and cfg.d_intermediate == 0:
        return transformers.MambaConfig(**common, time_step_rank=mixer.dt_rank)
    if types == {"Mamba2"} and cfg.d_intermediate == 0 and mixer.rmsnorm and mixer.ngroups in (1, mixer.nheads):
        return transformers.Mamba2Config(
            **common, num_heads=mixer.nheads, head_dim=mixer.headdim, n_groups=mixer.ngroups,
            chunk_size=mixer.chunk_size, time_step_limit=tuple(mixer.dt_limit),
        )
    return None


def twins(name: str, overrides: dict, seed: int) -> tuple[MambaLM, Optional[torch.nn.Module]]:
    """Our model and, where HF has the architecture, HF's model with the same weights."""
    torch.manual_seed(seed)
    ours = MambaLM(preset(name, **overrides))
    try:
        import transformers
    except ImportError:
        return ours, None
    config = hf_config(ours)
    if config is None:
        return ours, None
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = MambaLM.from_pretrained(tmp)  # our HF reader: the same weights
    n_ours, n_hf = (sum(p.numel() for p in m.parameters()) for m in (ours, hf))
    if n_ours != n_hf:
        raise RuntimeError(f"{name}: {n_ours:,} parameters in ours, {n_hf:,} in HF's twin")
    return ours, hf


def check_same_logits(ours: MambaLM, hf: torch.nn.Module, vocab: int) -> float:
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ours(ids).logits
        err = (hf(ids).logits[..., : ref.shape[-1]] - ref).abs().max().item()
    if err > 1e-3 * (1 + ref.abs().max().item()):
        raise RuntimeError(f"HF and our logits disagree: max abs diff {err:.3g}")
    return err


def decode_rate(generate: Callable[[int], object], batch: int, args) -> dict:
    """New tokens/s of ``generate(n)`` (n new tokens per row) and the copy bandwidth beside it.

    Each of ``--repeats`` rounds measures copy bandwidth, a 1-token generate (prefill
    and first sample) and a ``1 + --new-tokens`` one; the round's rate is its new
    tokens over the difference. Both are medians over the rounds: on a shared
    machine bandwidth drifts by 10-20% over minutes, so the bound a decode row is
    set against is measured between its own runs. Each round's pair is kept too.
    """
    generate(1 + args.new_tokens)  # warm-up
    rates, copies = [], []
    for _ in range(args.repeats):
        copies.append(measure_copy_bandwidth("cpu", nbytes=args.copy_bytes, repeats=3))
        t0 = time.perf_counter()
        generate(1)
        t1 = time.perf_counter()
        generate(1 + args.new_tokens)
        t2 = time.perf_counter()
        rates.append(batch * args.new_tokens / max((t2 - t1) - (t1 - t0), 1e-9))
    return {"tok_s": median(rates), "runs": args.repeats, "copy_gbps": median(copies),
            "rounds": [{"tok_s": r, "copy_gbps": c} for r, c in zip(rates, copies)]}


def measure(model, is_ours: bool, args, vocab: int, decode_only: bool = False) -> dict[str, dict]:
    """Tokens/s of each measure; ``decode_only``: the decode measures alone (a quantised model does not train)."""
    gen = torch.Generator().manual_seed(2)
    out = {}
    ids = torch.randint(0, vocab, (1, args.prefill), generator=gen)
    model.eval()
    with torch.no_grad():
        if not decode_only:
            t, n = timed(lambda: model(ids), args.repeats, args.slow_s)
            out["prefill"] = {"tok_s": args.prefill / t, "runs": n}
        for batch in args.decode_batch:
            prompt = torch.randint(0, vocab, (batch, PROMPT), generator=gen)

            for suffix, fused in (("", None), ("_unfused", False)) if is_ours else (("", None),):

                def generate(new: int, prompt=prompt, fused=fused):
                    if is_ours:
                        return model.generate(prompt, max_new_tokens=new, temperature=0, fused_step=fused)
                    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, pad_token_id=0)

                out[f"decode_b{batch}{suffix}"] = decode_rate(generate, batch, args)
    if decode_only:
        return out
    ids = torch.randint(0, vocab, (args.train_batch, args.train_seqlen), generator=gen)
    model.train()

    def train_step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    t, n = timed(train_step, args.repeats, args.slow_s)
    out["train"] = {"tok_s": args.train_batch * args.train_seqlen / t, "runs": n}
    model.zero_grad(set_to_none=True)
    model.eval()
    return out


def decode_breakdown(model: MambaLM, args, bandwidth_gbps: float) -> Optional[dict]:
    """Median seconds of each part of a batch-1 decode step, fused and op by op, beside its weights' streaming time.

    The fused step's parts are timed inside its one C++ call (``timed``); the op-by-op
    blocks around each ``Block.forward``. None when the model has no fused step.
    The prompt has no padding, so attention sees every key at the positions the caches count.
    """
    vocab, gen = model.config.vocab_size, torch.Generator().manual_seed(3)
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=gen)
    ids = torch.randint(0, vocab, (1, 1), generator=gen)
    blocks, backbone = model.backbone.layers, model.backbone
    head = model.lm_head.weight[:vocab]
    with torch.no_grad():
        fused_cache, cache = (model.allocate_cache(1, PROMPT + args.new_tokens + 1) for _ in range(2))
        model(prompt, cache=fused_cache)
        model(prompt, cache=cache)
        try:
            steps = [block.step_params(c) for block, c in zip(blocks, fused_cache.layers)]
        except FusedStepUnsupported:
            return None
        # The parts of the step: embedding, each block's step(s), final norm.
        owner = [None] + [i for i, block_steps in enumerate(steps) for _ in block_steps] + [None]
        fused = decode_step(backbone.embedding, [s for block_steps in steps for s in block_steps], backbone.norm_f,
                            timed=True)
        parts = {"embedding": [], "final norm": [], "lm_head": [], "step": []}
        per_block = {"fused": [[] for _ in blocks], "unfused": [[] for _ in blocks]}
        # The fused steps one after another, as generate runs them, then the op-by-op blocks: timed
        # between two unfused forwards, the fused step took twice generate's time per token (48 ms
        # against 24 ms in the EPYC run of 2026-12-03), its LM head 13 ms against 5.1 ms alone.
        for _ in range(args.new_tokens):
            t0 = time.perf_counter()
            hidden, seconds = fused(ids[:, 0], fused_cache.seqlen)
            t1 = time.perf_counter()
            fused_cache.set_seqlen(fused_cache.seqlen + 1)
            lm_logits(hidden, model.lm_head, vocab, model.backend)
            parts["lm_head"].append(time.perf_counter() - t1)
            parts["step"].append(time.perf_counter() - t0)
            seconds = seconds.tolist()
            parts["embedding"].append(seconds[0])
            parts["final norm"].append(seconds[-1])
            for i in range(len(blocks)):
                per_block["fused"][i].append(sum(t for t, o in zip(seconds, owner) if o == i))
        for _ in range(args.new_tokens):
            hidden, residual = backbone.embedding(ids), None
            for i, (block, c) in enumerate(zip(blocks, cache.layers)):
                t0 = time.perf_counter()
                hidden, residual = block(hidden, residual, c, None, None)
                per_block["unfused"][i].append(time.perf_counter() - t0)
    streamed = [tensor_bytes(*block.parameters()) / (bandwidth_gbps * 1e9) for block in blocks]
    return {
        "layers": [
            {"layer": i, "weight_bytes": tensor_bytes(*block.parameters()), "streamed_s": streamed[i],
             "fused_s": median(per_block["fused"][i]), "unfused_s": median(per_block["unfused"][i])}
            for i, block in enumerate(blocks)
        ],
        "lm_head": {"weight_bytes": tensor_bytes(head), "streamed_s": tensor_bytes(head) / (bandwidth_gbps * 1e9),
                    "s": median(parts["lm_head"])},
        "embedding_s": median(parts["embedding"]),
        "final_norm_s": median(parts["final norm"]),
        "step_s": median(parts["step"]),
        "copy_gbps": bandwidth_gbps,
    }


def print_breakdown(name: str, b: dict) -> None:
    layers = b["layers"]
    n = len(layers)
    total = {key: sum(layer[key] for layer in layers) for key in ("weight_bytes", "streamed_s", "fused_s", "unfused_s")}
    print(f"# {name}: one batch-1 decode step by part, medians; 'streamed': its weights at copy bandwidth "
          f"({b['copy_gbps']:.1f} GB/s, measured just before), 'rest': the time beyond that")
    print(f"{'part':<26} {'weights MB':>10} {'streamed ms':>11} {'fused ms':>9} {'rest ms':>8} {'unfused ms':>10} "
          f"{'rest ms':>8}")
    head = b["lm_head"]
    between = b["step_s"] - total["fused_s"] - head["s"] - b["embedding_s"] - b["final_norm_s"]
    rows = [
        (f"block (mean of {n})", total["weight_bytes"] / n, total["streamed_s"] / n, total["fused_s"] / n,
         total["unfused_s"] / n),
        (f"blocks (all {n})", total["weight_bytes"], total["streamed_s"], total["fused_s"], total["unfused_s"]),
        ("lm_head", head["weight_bytes"], head["streamed_s"], head["s"], None),
        ("embedding + final norm", 0, 0.0, b["embedding_s"] + b["final_norm_s"], None),
        ("unattributed (calls, jitter)", 0, 0.0, between, None),
        ("step (fused)", total["weight_bytes"] + head["weight_bytes"], total["streamed_s"] + head["streamed_s"],
         b["step_s"], None),
    ]
    for part, nbytes, streamed, fused, unfused in rows:
        line = f"{part:<26} {nbytes / 1e6:>10.1f} {streamed * 1e3:>11.3f} {fused * 1e3:>9.3f} {(fused - streamed) * 1e3:>8.3f}"
        if unfused is not None:
            line += f" {unfused * 1e3:>10.3f} {(unfused - streamed) * 1e3:>8.3f}"
        print(line)
    print(f"(the fused step streams its weights {(total['streamed_s'] + head['streamed_s']) / b['step_s']:.0%} "
          "of its time at copy bandwidth)")


def weight_bytes(model: MambaLM) -> int:
    # A quantised model's int8 or bf16 weights and fp32 scales are parameters too: its own bytes.
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bound(model: MambaLM, measure: str, measured: dict, bandwidth_gbps: float, peak_gflops: float) -> float:
    """The roofline of ``measure``: decode ``batch * copy bandwidth / weight bytes`` (every weight read once
    per step; the bandwidth measured beside the decode runs), prefill ``peak / 2N``, training ``peak / 6N``."""
    if measure.startswith("decode_b"):
        batch = int(measure.removeprefix("decode_b").removesuffix("_unfused"))
        return batch * measured["copy_gbps"] * 1e9 / weight_bytes(model)
    n_params = sum(p.numel() for p in model.parameters())
    return peak_gflops * 1e9 / ({"prefill": 2, "train": 6}[measure] * n_params)


def write_plot(path: Path, rows: list[dict], title: str) -> Optional[str]:
    """Each measure as a fraction of its roofline, ours beside HF's; returns why not when skipped."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        return f"plot skipped: matplotlib not installed ({exc}): pip install matplotlib"
    figure = Figure(figsize=(10, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    xs = range(len(rows))
    axes.bar([x - 0.2 for x in xs], [r["ours_tok_s"] / r["bound_tok_s"] for r in rows], 0.4, label="lnlm_ssm")
    axes.bar([x + 0.2 for x in xs], [(r["hf_tok_s"] or 0) / r["bound_tok_s"] for r in rows], 0.4,
             label="HF transformers, fp32 (none for the hybrid)")
    labels = [f"{r['preset'].removesuffix('-130m')} {r['weights']}\n{r['measure']}" for r in rows]
    axes.set_xticks(list(xs), labels, fontsize=7)
    axes.set_ylabel("fraction of the roofline")
    axes.set_title(title, fontsize=9)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=PRESETS, help=f"default: {' '.join(PRESETS)}")
    p.add_argument("--prefill", type=int, default=1024, help="prefill tokens (batch 1)")
    p.add_argument("--decode-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=32, help="decode tokens timed per generate")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seqlen", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--slow-s", type=float, default=20.0, help="a run slower than this is measured once")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    p.add_argument("--quantize", nargs="*", choices=QUANTIZATION_MODES, default=list(QUANTIZATION_MODES),
                   help="weight-only modes to decode with as well (default: int8 bf16; none: no quantised rows)")
    p.add_argument("--quantize-presets", nargs="+", default=["mamba-130m"],
                   help="the presets decoded quantised too (default: mamba-130m)")
    p.add_argument("--quick", action="store_true", help="tiny models and sizes (CI)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    for name in ("prefill", "new_tokens", "train_batch", "train_seqlen", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.decode_batch) < 1:
        p.error(f"--decode-batch sizes must be >= 1, got {args.decode_batch}")
    if args.quick:
        args.prefill, args.new_tokens, args.train_batch, args.train_seqlen, args.repeats = 32, 4, 2, 16, 1
    # The copy buffer: 256 MiB, well beyond the last-level cache; a small one for the CI's quick run.
    args.copy_bytes = (16 << 20) if args.quick else (256 << 20)
    args.out = args.out or HERE / "out" / f"model_speed-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return args


def print_table(rows: list[dict]) -> None:
    """One line per measure; "HF tok/s" is always HF's fp32 model (the quantised rows' target is its speed)."""
    print(f"{'preset':<12} {'weights':<7} {'measure':<16} {'lnlm_ssm tok/s':>15} {'HF tok/s':>10} {'vs HF':>7} "
          f"{'copy GB/s':>10} {'bound tok/s':>12} {'of bound':>9}")
    for r in rows:
        if r["hf_tok_s"]:
            hf = f"{r['hf_tok_s']:>10.1f} {r['ours_tok_s'] / r['hf_tok_s']:>6.1f}x"
        else:
            hf = f"{'-':>10} {'-':>7}"
        print(f"{r['preset']:<12} {r['weights']:<7} {r['measure']:<16} {r['ours_tok_s']:>15.1f} {hf} "
              f"{r['copy_gbps']:>10.1f} {r['bound_tok_s']:>12.1f} {r['ours_tok_s'] / r['bound_tok_s']:>8.0%}")


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = QUICK if args.quick else {}
    rows, notes, breakdown = [], [], {}
    with torch_threads(args.threads):
        print(f"# fp32 activations, {args.threads} threads, torch {torch.__version__}; prefill 1x{args.prefill}, decode "
              f"{args.new_tokens} tokens at batch {', '.join(map(str, args.decode_batch))}, training "
              f"{args.train_batch}x{args.train_seqlen}", flush=True)
        for name in args.presets:
            if args.no_hf:
                torch.manual_seed(args.seed)
                ours, hf = MambaLM(preset(name, **overrides)), None
            else:
                ours, hf = twins(name, overrides, args.seed)
            vocab = ours.config.vocab_size
            if hf is None and not args.no_hf:
                notes.append(f"{name}: HF transformers has no model with this layout (or is not installed)")
            if hf is not None:
                err = check_same_logits(ours, hf, vocab)
                print(f"# {name}: HF {type(hf).__name__} holds the same weights (logits max abs diff {err:.2g})",
                      flush=True)
            bandwidth, peak = measure_copy_bandwidth("cpu"), measure_matmul_peak("cpu")
            print(f"# {name}: copy {bandwidth:.1f} GB/s, matmul {peak:.1f} GFLOP/s", flush=True)
            mine = measure(ours, True, args, vocab)
            theirs = measure(hf, False, args, vocab) if hf is not None else {}
            runs = [("fp32", ours, mine)]
            for mode in args.quantize if name in args.quantize_presets else []:
                quantized = quantize_(copy.deepcopy(ours), mode)
                runs.append((mode, quantized, measure(quantized, True, args, vocab, decode_only=True)))
            for weights, model, measured in runs:
                for key, value in measured.items():
                    hf_key = key.removesuffix("_unfused")  # HF's one decode (fp32), beside each of ours
                    rows.append({
                        "preset": name, "weights": weights, "measure": key, "ours_tok_s": value["tok_s"],
                        "ours_runs": value["runs"],
                        "hf_tok_s": theirs[hf_key]["tok_s"] if theirs else None,
                        "hf_runs": theirs[hf_key]["runs"] if theirs else None,
                        "bound_tok_s": bound(model, key, value, bandwidth, peak), "weight_bytes": weight_bytes(model),
                        "copy_gbps": value.get("copy_gbps", bandwidth), "matmul_gflops": peak,
                        **({"rounds": value["rounds"]} if "rounds" in value else {}),
                    })
            print_table([r for r in rows if r["preset"] == name])
            for weights, model, _ in runs:
                key = name if weights == "fp32" else f"{name} {weights}"
                breakdown[key] = decode_breakdown(model, args, measure_copy_bandwidth("cpu", nbytes=args.copy_bytes))
                if breakdown[key] is None:
                    notes.append(f"{key}: no fused decode step, so no breakdown")
                else:
                    print_breakdown(key, breakdown[key])
            print(flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    skipped = write_plot(args.out / "model_speed.png", rows,
                         f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    notes += [skipped] if skipped else []
    for note in notes:
        print(f"note: {note}")
    with open(args.out / "results.json", "w") as f:
        json.dump({
            "benchmark": "model_speed",
            "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                        "torch": torch.__version__},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "rows": rows,
            "breakdown": breakdown,
            "notes": notes,
        }, f, indent=2)
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
