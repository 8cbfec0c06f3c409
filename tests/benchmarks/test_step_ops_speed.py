"""benchmarks/step_ops_speed.py runs end to end on tiny sizes and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_ops_speed.py"


def test_quick_run_writes_every_row(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("step_ops_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--threads", "1", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    by_case: dict[str, set] = {}
    for r in rows:
        assert r["median_us"] > 0 and r["x_fastest_torch"] > 0
        assert ("gb_per_s" in r) == r["case"].startswith(("decode_linear", "weight-only"))
        if "gb_per_s" in r:
            assert r["gb_per_s"] > 0 and r["x_copy_bw"] > 0
        by_case.setdefault(r["case"].split(" (")[0], set()).add(r["impl"])
    assert by_case == {
        "conv1d fwd": {"cpu", "reference", "torch F.conv1d"},
        "conv1d fwd+bwd": {"cpu", "reference", "torch F.conv1d"},
        "conv1d update": {"cpu", "reference", "torch roll"},
        "state update mamba1": {"cpu", "reference"},
        "state update mamba2": {"cpu", "reference"},
        "decode_linear in_proj": {"cpu", "torch F.linear"},
        "decode_linear out_proj": {"cpu", "torch F.linear"},
        # Two projections of different shapes: each row times its own weights (a closure over the
        # loop's last weights once fed out_proj's to in_proj's rows, and raised).
        **{f"weight-only {name}": {"cpu int8", "aten int8pack_mm", "cpu bf16", "torch F.linear bf16", "torch F.linear"}
           | ({"torchao int8wo"} if importlib.util.find_spec("torchao") else set()) for name in ("in_proj", "out_proj")},
    }
    out = capsys.readouterr().out
    assert "x fastest torch" in out and "x copy bw" in out
    # The weight-only rows count their own format's bytes: int8 about a quarter of fp32's, bf16 half.
    moved = {r["impl"]: r["bytes"] for r in rows if r["case"].startswith("weight-only in_proj") and "rows 1)" in r["case"]}
    assert moved["cpu int8"] < moved["cpu bf16"] < moved["torch F.linear"]


def test_only_times_the_cases_named(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("step_ops_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--quick", "--threads", "1", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    assert module.main(argv + ["--only", "weight-only"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows and all(r["case"].startswith("weight-only") for r in rows)
    with pytest.raises(SystemExit):
        module.main(argv + ["--only", "nothing"])
    assert "matches no case" in capsys.readouterr().err
