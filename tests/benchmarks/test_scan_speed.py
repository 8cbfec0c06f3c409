"""benchmarks/scan_speed.py runs end to end on tiny sizes and writes its JSON and plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scan_speed.py"

# One thread: these runs check the plumbing, and on a busy 2-core CI machine a
# second OpenMP thread only adds waiting.
TINY = {
    "selective_scan": ["--threads", "1", "--batch", "1", "--dim", "8", "--dstate", "4", "--seqlens", "16,32"],
    "ssd": [
        "--op", "ssd", "--threads", "1", "--batch", "1", "--nheads", "2", "--headdim", "4", "--dstate", "4",
        "--ngroups", "1", "--chunk-size", "8", "--seqlens", "16,32",
    ],
}


@pytest.fixture(scope="module")
def scan_speed():
    spec = importlib.util.spec_from_file_location("scan_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


@pytest.mark.parametrize("op", ["selective_scan", "ssd"])
def test_quick_run_writes_rows_json_and_plot(scan_speed, op, tmp_path, capsys):
    assert scan_speed.main(["--quick", *TINY[op], "--out", str(tmp_path)]) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["op"] == op
    assert results["machine"]["torch"]
    assert results["ceilings"]["copy_gbps"] > 0 and results["ceilings"]["matmul_gflops"] > 0

    reference = [r for r in results["rows"] if r["key"] == "reference"]
    assert [r["seqlen"] for r in reference] == [16, 32]
    for row in reference:
        assert row["fwd_ms"] > 0 and row["fwdbwd_ms"] > 0
        assert row["speedup_fwd"] == pytest.approx(1.0)
        assert row["bytes"] > 0 and row["flops"] > 0 and row["fwd_gbps"] > 0
    # Every row that ran agreed with the reference on the first size.
    assert results["checks"] and all(c["ok"] for c in results["checks"])

    if _has_matplotlib():
        assert (tmp_path / "time_vs_seqlen.png").stat().st_size > 0
    else:
        assert any("matplotlib" in n for n in results["notes"])

    printed = capsys.readouterr().out
    assert "# ceilings: copy bandwidth" in printed
    assert "reference (PyTorch" in printed


def test_budget_skips_measurements_that_cannot_fit(scan_speed, tmp_path):
    args = ["--quick", *TINY["selective_scan"], "--backends", "reference"]
    assert scan_speed.main([*args, "--budget-s", "1e-9", "--out", str(tmp_path)]) == 0

    first, second = json.loads((tmp_path / "results.json").read_text())["rows"]
    # Nothing fits in a nanosecond. At the first seqlen the one fwd call made to
    # find that out is reported, flagged; fwd+bwd, known to take longer, is skipped ...
    assert len(first["fwd_ms_all"]) == 1 and first["fwdbwd_ms"] is None
    assert any("fwd a single cold call" in n for n in first["notes"])
    assert any("fwd+bwd skipped: fwd alone takes" in n for n in first["notes"])
    # ... and the next seqlen, extrapolated from the first, is skipped with a note.
    assert second["fwd_ms"] is None and second["fwdbwd_ms"] is None
    assert sum("skipped:" in n and "--budget-s" in n for n in second["notes"]) == 2


def test_budget_plan_extrapolates_from_shorter_seqlens(scan_speed):
    args = scan_speed.parse_args(["--quick", "--budget-s", "10", "--warmup", "2", "--repeats", "10"])
    # Linear extrapolation when one point is known; the fitted exponent (here 2) with two.
    assert scan_speed._predict([(100, 1.0)], 200) == pytest.approx(2.0)
    assert scan_speed._predict([(100, 1.0), (200, 4.0)], 400) == pytest.approx(16.0)
    # 0.5 s/call in a 10 s budget: 2 warm-up + at most 18 calls, capped at --repeats.
    assert scan_speed._plan(args, 0.5, 0, 0) == (2, 10)
    # 2 s/call with 2 memory-probe calls: 3 calls left, 1 warm-up is dropped to keep 3 repeats.
    assert scan_speed._plan(args, 2.0, 1, 2) == (0, 3)
    # 3 s/call: 1 warm-up + 3 repeats = 12 s > 10 s.
    assert scan_speed._plan(args, 3.0, 0, 0) is None


def test_mambapy_row_matches_reference(scan_speed, tmp_path):
    pytest.importorskip("mambapy")
    scan_speed.main(["--quick", *TINY["selective_scan"], "--backends", "reference,mambapy", "--out", str(tmp_path)])

    results = json.loads((tmp_path / "results.json").read_text())
    (check,) = [c for c in results["checks"] if c["impl"] == "mambapy pscan"]
    assert check["ok"] and check["max_abs_err"] < 1e-4
    assert {r["impl"] for r in results["rows"]} == {"reference (PyTorch loop)", "mambapy pscan"}


def test_a_size_over_budget_is_not_probed_again_at_longer_seqlens(scan_speed):
    args = scan_speed.parse_args(["--quick", "--budget-s", "1e-9"])
    calls, history = [], []
    times, note = scan_speed._measure_one(args, lambda: calls.append(1), "cpu", history, 16, 0)
    assert len(times) == 1 and "single cold call" in note
    for seqlen in (32, 64):
        times, note = scan_speed._measure_one(args, lambda: calls.append(1), "cpu", history, seqlen, 0)
        assert times is None and "--budget-s" in note
    # One call at the first size; the longer ones are extrapolated from it.
    assert len(calls) == 1 and [s for s, _ in history] == [16]
    # A fwd+bwd whose fwd alone already blows the budget is skipped without a call.
    times, note = scan_speed._measure_one(args, lambda: calls.append(1), "cpu", [], 16, 0, floor_s=1.0)
    assert times is None and "fwd alone takes" in note and len(calls) == 1
