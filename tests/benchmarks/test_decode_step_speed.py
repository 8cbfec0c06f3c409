"""benchmarks/decode_step_speed.py runs end to end on a tiny model and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode_step_speed.py"


@pytest.fixture(scope="module")
def decode_step_speed():
    spec = importlib.util.spec_from_file_location("decode_step_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(module, tmp_path, *extra):
    assert module.main(["--quick", "--threads", "1", "--batch", "1", "2", "--out", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / "results.json").read_text())["rows"]


def test_quick_run_without_compile(decode_step_speed, tmp_path):
    rows = run(decode_step_speed, tmp_path, "--no-compile")
    assert [(r["batch"], r["row"]) for r in rows] == [(b, row) for b in (1, 2) for row in ("eager", "fused")]
    for r in rows:
        assert r["tok_s"] > 0 and r["of_bound"] > 0
        assert r["logits_max_abs_diff_vs_eager"] < 1e-4
        assert "compile_s" not in r


@pytest.mark.slow
def test_quick_run_with_compile(decode_step_speed, tmp_path):
    rows = run(decode_step_speed, tmp_path)
    assert [r["row"] for r in rows if r["batch"] == 1] == ["eager", "fused", *decode_step_speed.COMPILED]
    for r in rows:
        assert r["logits_max_abs_diff_vs_eager"] < 1e-4
        if r["row"].startswith("compile"):
            assert r["compile_s"] > 0 and r["recompiles_after_warmup"] == 0
