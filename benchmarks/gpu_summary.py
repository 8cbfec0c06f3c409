#!/usr/bin/env python
"""The short summary table that ``benchmarks/gpu_check.sh`` prints last.

Reads a results folder: ``versions.json`` and ``steps.tsv`` (written by the
script), the pytest log ``tests.log``, and every ``results.json`` of
``scan_speed.py`` below the folder. Prints the card and versions, each step's
status and seconds, the test counts, and per op and backend the fwd and
fwd+bwd milliseconds at the largest seqlen with the fraction of the measured
copy bandwidth. Missing pieces are reported as missing, never guessed.

Usage::

    python benchmarks/gpu_summary.py benchmarks/results/gpu-20261127
    python benchmarks/gpu_summary.py benchmarks/results   # the CPU results kept there
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _versions(folder: Path) -> list[str]:
    info = _read_json(folder / "versions.json")
    if not info:
        return ["versions: missing (versions.json)"]
    lines = [f"{key}: {info[key]}" for key in ("card", "driver", "torch", "cuda", "triton", "python") if key in info]
    backends = _read_json(folder / "backends.json")
    if backends:
        lines += [f"backend {name}: {status}" for name, status in backends.items()]
    return lines


def _steps(folder: Path) -> list[str]:
    path = folder / "steps.tsv"
    if not path.exists():
        return []
    lines = ["steps:"]
    for row in path.read_text().splitlines():
        name, status, seconds, *note = row.split("\t") + [""]
        lines.append(f"  {name:<20} {status:<8} {seconds:>5}s  {note[0]}".rstrip())
    return lines


def _tests(folder: Path) -> str:
    path = folder / "tests.log"
    if not path.exists():
        return "tests: not run (no tests.log)"
    # pytest's last line, e.g. "== 120 passed, 3 skipped, 1 failed in 42.0s ==".
    for line in reversed(path.read_text(errors="replace").splitlines()):
        counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors|xfailed|deselected)", line)
        if counts:
            return "tests: " + ", ".join(f"{n} {what}" for n, what in counts)
    return "tests: no pytest summary line in tests.log (crashed or timed out?)"


def _bench_rows(folder: Path) -> list[tuple[str, str, int, str, str, str]]:
    rows = []
    for path in sorted(folder.rglob("results.json")):
        data = _read_json(path)
        if not data or data.get("benchmark") != "scan_speed":
            continue
        device = data.get("args", {}).get("device", "?")
        by_impl: dict[str, dict] = {}
        for row in data.get("rows", []):
            best = by_impl.get(row["impl"])
            if best is None or row["seqlen"] > best["seqlen"]:
                by_impl[row["impl"]] = row
        for impl, row in by_impl.items():
            fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            rows.append((
                f"{data.get('op', '?')} ({device})",
                impl + ("" if row.get("check_ok", True) else "  MISMATCH"),
                row["seqlen"],
                fmt(row.get("fwd_ms"), ".3f"),
                fmt(row.get("fwdbwd_ms"), ".3f"),
                fmt(row.get("frac_bandwidth"), ".1%"),
            ))
    return rows


def summary(folder: Path) -> str:
    lines = [f"== summary of {folder} =="]
    lines += _versions(folder)
    lines += _steps(folder)
    lines.append(_tests(folder))
    rows = _bench_rows(folder)
    if not rows:
        lines.append("benchmarks: no scan_speed results.json found")
    else:
        header = ("op", "backend", "seqlen", "fwd ms", "fwd+bwd ms", "of copy BW")
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        for r in [header] + rows:
            lines.append("  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w)
                                   for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a results folder written by gpu_check.sh (or any folder of "
                        "scan_speed results)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"folder {args.folder} does not exist")
    print(summary(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
