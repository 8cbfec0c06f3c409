"""``lnlm-ssm eval --model PATH --tasks a,b [--include-path DIR] [--limit N] --out DIR``: lm-evaluation-harness."""

from __future__ import annotations

from lnlm_ssm.utils.checks import check_positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="run lm-evaluation-harness tasks on a checkpoint (needs the eval extra)",
        description="Evaluate --model on lm-eval --tasks through the 'lnlm_ssm' lm-eval model; writes lm-eval's "
        "results JSON (per-sample outputs included) to --out/results.json and prints lm-eval's table.",
    )
    p.add_argument("--model", required=True, help="a checkpoint directory or Hub repo id (its tokenizer is used)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="a directory of extra lm-eval task YAML files")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--out", required=True, help="directory for results.json")
    p.add_argument("--batch-size", type=int, default=1, help="requests per forward (default 1)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, or auto (as stored)")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per scored window (default 2048)")
    p.set_defaults(handler=_eval)


def _eval(args) -> int:
    # lm-eval is an optional extra: only this subcommand needs it, so only it imports it.
    from lnlm_ssm.evaluation import evaluate
    from lm_eval.utils import make_table

    if args.limit is not None:
        check_positive_int("--limit", args.limit)
    tasks = [t for t in args.tasks.split(",") if t]
    results = evaluate(
        args.model, tasks, out=args.out, include_path=args.include_path, limit=args.limit,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, max_length=args.max_length,
    )
    print(make_table(results))
    print(f"results in {args.out}/results.json")
    return 0
