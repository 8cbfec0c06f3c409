"""``lnlm-ssm train --preset NAME --data DIR --steps N --out DIR [--config run.toml] ...``."""

from __future__ import annotations

import os

from lnlm_ssm.training.config import add_arguments, config_from_args
from lnlm_ssm.training.loop import train


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a text corpus (also under torchrun)",
        description="Train a preset (with --model overrides) on --data; metrics.jsonl, loss.png, checkpoints and "
        "the final model (for `lnlm-ssm generate --model OUT/model`) go to --out. Flags override --config's "
        "TOML values. Under `torchrun --nproc-per-node N -m lnlm_ssm.train --distributed ddp ...` each process "
        "trains on its slice of the global --batch-size.",
    )
    add_arguments(p)
    p.set_defaults(handler=_train)


def _train(args) -> int:
    result = train(config_from_args(args))
    if os.environ.get("RANK", "0") == "0":
        if "eval_bpb" in result:
            held_out = f"held-out loss {result['eval_loss']:.4f} ({result['eval_bpb']:.3f} bits/byte)"
        else:
            held_out = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("eval_")) or "no eval data"
        print(f"trained {result['step']} steps: loss {result['loss']:.4f}, {held_out}; model in {result['model_dir']}")
    return 0
