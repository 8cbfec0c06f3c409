"""benchmarks/step_ops_speed.py runs end to end on tiny sizes and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

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
        assert ("gb_per_s" in r) == r["case"].startswith("decode_linear")
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
    }
    out = capsys.readouterr().out
    assert "x fastest torch" in out and "x copy bw" in out
