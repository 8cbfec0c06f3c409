"""The ``lnlm-ssm`` command line: one module per subcommand (``generate``, ``train``, ``eval``, ``fill-mask``, ``infill``, ``predict``).

Each subcommand module has ``add_parser(subparsers)``, which registers its
arguments and its handler.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from lnlm_ssm.cli import evaluate, fill_mask, generate, infill, predict, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lnlm-ssm", description="Mamba language models: kernels, models, generation")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate.add_parser(subparsers)
    train.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    fill_mask.add_parser(subparsers)
    infill.add_parser(subparsers)
    predict.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (2 for a bad argument or input)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"lnlm-ssm {args.command}: error: {err}", file=sys.stderr)
        return 2
