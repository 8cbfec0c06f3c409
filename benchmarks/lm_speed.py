#!/usr/bin/env python
"""Whole-model speed: MambaLM beside HF transformers' MambaForCausalLM, same weights, one run.

Usage::

    python benchmarks/lm_speed.py                 # mamba-130m, fp32, 2 threads, CPU
    python benchmarks/lm_speed.py --quick         # a tiny model (CI)

Both models hold the same randomly initialised weights (HF's key layout differs
from ours only in ``backbone.embeddings``), and their logits on the prompt are
compared before anything is timed. Three
measures, each a median over ``--repeats``:

- prefill: one forward over a (batch, prompt) batch, no grad -> tokens/s;
- decode: ``--new-tokens`` greedy tokens after the prompt -> new tokens/s
  (ours: ``MambaLM.generate``; HF: ``generate(do_sample=False)``, both with their caches);
- training: forward + backward of a (batch, prompt) batch with the LM loss -> tokens/s.

HF's Mamba falls back to a sequential scan in PyTorch on CPU; ours runs the
``"auto"`` backend (the C++ kernels on CPU). Results go to ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

from lnlm_ssm import MambaLM
from lnlm_ssm.utils.benchmark import median, torch_threads

HERE = Path(__file__).resolve().parent


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def hf_twin(model: MambaLM):
    """HF's MambaForCausalLM with ``model``'s weights (via our HF-layout export), or None without transformers."""
    try:
        from transformers import MambaConfig, MambaForCausalLM
    except ImportError:
        return None
    cfg = model.config
    ssm = {k: v for k, v in cfg.ssm_cfg.items() if k != "layer"}
    hf_config = MambaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layer,
        state_size=ssm.get("d_state", 16),
        conv_kernel=ssm.get("d_conv", 4),
        expand=ssm.get("expand", 2),
        layer_norm_epsilon=cfg.norm_epsilon,
        residual_in_fp32=cfg.residual_in_fp32,
        tie_word_embeddings=cfg.tie_embeddings,
        use_cache=True,
    )
    hf = MambaForCausalLM(hf_config)
    ours = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in model.state_dict().items()}
    ours["backbone.embeddings.weight"] = ours["backbone.embeddings.weight"][: cfg.vocab_size]
    ours["lm_head.weight"] = ours["backbone.embeddings.weight"]
    missing, unexpected = hf.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto HF's Mamba: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mamba-130m")
    p.add_argument("--quick", action="store_true", help="tiny model, few tokens (CI)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=512, help="prompt length (prefill, training)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers rows")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    overrides = {}
    if args.quick:
        overrides = dict(d_model=64, n_layer=2, vocab_size=300)
        args.prompt, args.new_tokens, args.repeats = 32, 4, 1
    args.out = args.out or HERE / "out" / f"lm_speed-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"

    torch.manual_seed(0)
    rows = []
    with torch_threads(args.threads):
        ours = MambaLM.from_name(args.preset, **overrides).eval()
        hf = None if args.no_hf else hf_twin(ours)
        vocab = ours.config.vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = ours(ids).logits
            if hf is not None:
                err = (hf(ids).logits - ref).abs().max().item()
                if err > 1e-3 * (1 + ref.abs().max().item()):
                    raise RuntimeError(f"HF and our logits disagree: max abs diff {err:.3g}")
        models = [("lnlm_ssm MambaLM", ours)] + ([("HF MambaForCausalLM", hf)] if hf is not None else [])
        for name, model in models:
            is_ours = model is ours

            def prefill(model=model):
                with torch.no_grad():
                    model(ids)

            def decode(model=model, is_ours=is_ours):
                with torch.no_grad():
                    if is_ours:
                        model.generate(ids, max_new_tokens=args.new_tokens, temperature=0)
                    else:
                        model.generate(
                            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False,
                        )

            def train_step(model=model):
                model.zero_grad(set_to_none=True)
                out = model(ids, labels=ids)
                out.loss.backward()

            t_prefill = timed(prefill, args.repeats)
            t_decode = timed(decode, args.repeats)
            model.train()
            t_train = timed(train_step, args.repeats)
            model.eval()
            tokens = args.batch * args.prompt
            rows.append({
                "model": name,
                "prefill_tok_s": tokens / t_prefill,
                # Decode time includes one prefill; subtract it to count only the new tokens.
                "decode_tok_s": args.batch * args.new_tokens / max(t_decode - t_prefill, 1e-9),
                "train_tok_s": tokens / t_train,
            })
    print(f"# {args.preset}{' (quick)' if args.quick else ''}: batch {args.batch}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, fp32, {args.threads} threads, torch {torch.__version__}")
    print(f"{'model':<22} {'prefill tok/s':>14} {'decode tok/s':>13} {'train tok/s':>12}")
    for r in rows:
        print(f"{r['model']:<22} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} {r['train_tok_s']:>12.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.json", "w") as f:
        json.dump({"benchmark": "lm_speed", "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
