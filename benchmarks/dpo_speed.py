"""How much does running each pair's prompt once save in a DPO step?

One DPO training step (policy forward + backward, reference forward) with the
shared prefix (the prompt runs once; both completions continue from its cache,
with gradients) against two full forwards of ``[prompt; chosen]`` and
``[prompt; rejected]``, at prompt:completion length ratios 1:1, 4:1 and 16:1,
for a Mamba-1, a Mamba-2, a hybrid and an attention model. Median step times;
JSON to --out.

    python benchmarks/dpo_speed.py            # the full run (under 5 minutes on 2 quiet cores)
    python benchmarks/dpo_speed.py --quick    # CI: tiny models, one ratio's worth of repeats
"""

from __future__ import annotations

import argparse
import importlib.util
import copy
import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("lnlm_ssm") is None:  # a checkout that was never `pip install`ed
    sys.path.insert(0, str(HERE.parent))

from lnlm_ssm.data.finetune import FinetuneBatch  # noqa: E402
from lnlm_ssm.models import MambaLM, MambaLMConfig  # noqa: E402
from lnlm_ssm.objectives import DPOObjective  # noqa: E402
from lnlm_ssm.utils.benchmark import median, time_fn, torch_threads  # noqa: E402

RATIOS = ((1, 1), (4, 1), (16, 1))


def families(d_model: int, n_layer: int) -> dict[str, MambaLMConfig]:
    heads = max(1, d_model // 64)
    attn = {"num_heads": heads, "head_dim": d_model // heads, "rotary_emb_dim": d_model // heads}
    mamba2 = {"layer": "Mamba2", "headdim": min(64, d_model // 2), "chunk_size": 64}
    common = dict(d_model=d_model, n_layer=n_layer, vocab_size=257)
    return {
        "mamba": MambaLMConfig(**common, ssm_cfg={"layer": "Mamba1"}),
        "mamba2": MambaLMConfig(**common, ssm_cfg=mamba2),
        "hybrid": MambaLMConfig(**common, layer_pattern="MMMA"[: max(2, min(4, n_layer))], ssm_cfg=mamba2,
                                attn_cfg=attn),
        "attention": MambaLMConfig(**common, layer_pattern="A", d_intermediate=2 * d_model, attn_cfg=attn),
    }


def pairs(batch: int, prompt_len: int, completion_len: int) -> FinetuneBatch:
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, 256, (batch, n), generator=g)

    ones = torch.ones(batch, completion_len, dtype=torch.long)
    return FinetuneBatch(dict(
        prompt_ids=ids(prompt_len), prompt_mask=torch.ones(batch, prompt_len, dtype=torch.long),
        chosen_ids=ids(completion_len), chosen_mask=ones, rejected_ids=ids(completion_len), rejected_mask=ones,
    ))


def step_time(model, objective, batch, shared: bool, warmup: int, repeats: int) -> float:
    objective.shared_prefix = shared

    def step():
        model.zero_grad(set_to_none=True)
        objective(model, batch).loss.backward()

    return median(time_fn(step, warmup=warmup, repeats=repeats, device="cpu"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and few repeats (CI)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(HERE / "results" / "dpo_speed-latest"), help="results folder")
    args = parser.parse_args(argv)
    # Sized for under 5 minutes on 2 quiet cores. On one torch thread (2026-12-03), a 16:1 step at batch 4 took
    # 3.6-5.3 s with two full forwards and 1.7-2.7 s shared (Mamba-1 .. attention): with the shorter ratios, 4 steps
    # of each come to ~3 min in all (batch 8 and 7 steps, as before, to ~10).
    d_model, n_layer, batch, completion = (32, 2, 2, 8) if args.quick else (256, 4, 4, 64)
    warmup, repeats = (1, 2) if args.quick else (1, 3)
    rows = []
    with torch_threads(args.threads):
        for name, config in families(d_model, n_layer).items():
            torch.manual_seed(0)
            model = MambaLM(config)
            objective = DPOObjective()
            objective.reference = copy.deepcopy(model).requires_grad_(False)
            for p, c in RATIOS:
                data = pairs(batch, p * completion, c * completion)
                full = step_time(model, objective, data, False, warmup, repeats)
                shared = step_time(model, objective, data, True, warmup, repeats)
                rows.append(dict(family=name, ratio=f"{p}:{c}", prompt=p * completion, completion=c * completion,
                                 full_s=full, shared_s=shared, saving=1 - shared / full))
                print(f"{name:10s} {p:2d}:{c}  two full forwards {full * 1e3:8.1f} ms   shared prompt "
                      f"{shared * 1e3:8.1f} ms   saving {100 * (1 - shared / full):5.1f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                threads=torch.get_num_threads(), d_model=d_model, n_layer=n_layer, batch=batch, quick=args.quick)
    (out / "dpo_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
