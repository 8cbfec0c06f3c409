"""``lnlm-ssm infill --model DIR --prefix TEXT --suffix TEXT --length N``: fill the middle with an any-order model."""

from __future__ import annotations

import sys

import torch

from lnlm_ssm.data.tokenizers import load_tokenizer
from lnlm_ssm.models.any_order_lm import AnyOrderLM


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "infill",
        help="generate the text between a prefix and a suffix (an AnyOrderLM checkpoint, e.g. trained --objective plm)",
        description="Fill --length tokens between --prefix and --suffix, left to right, with an AnyOrderLM "
        "checkpoint; the middle is written to stdout.",
    )
    p.add_argument("--model", required=True, help="an AnyOrderLM checkpoint directory")
    p.add_argument("--prefix", default="", help="the text before the gap (default: none)")
    p.add_argument("--suffix", default="", help="the text after the gap (default: none)")
    p.add_argument("--length", type=int, required=True, help="how many tokens to generate in the gap")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed of sampling")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(handler=_infill)


def _infill(args) -> int:
    if args.length < 1:
        raise ValueError(f"--length must be >= 1; got {args.length}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AnyOrderLM.from_pretrained(args.model, device=device).eval()
    tokenizer = load_tokenizer(args.model)
    prefix, suffix = tokenizer.encode(args.prefix), tokenizer.encode(args.suffix)
    if not prefix and not suffix:
        raise ValueError("give --prefix or --suffix (or both): infilling needs at least one known token")
    total = len(prefix) + args.length + len(suffix)
    if total > model.config.max_positions:
        raise ValueError(
            f"--prefix ({len(prefix)} tokens) + --length ({args.length}) + --suffix ({len(suffix)} tokens) = {total}; "
            f"the model has max_positions={model.config.max_positions}"
        )
    generator = None if args.seed is None else torch.Generator(device=device).manual_seed(args.seed)
    middle = model.infill(
        torch.tensor([prefix], dtype=torch.long, device=device),
        torch.tensor([suffix], dtype=torch.long, device=device),
        args.length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
    )
    sys.stdout.write(tokenizer.decode(middle[0].tolist()) + "\n")
    sys.stdout.flush()
    return 0
