"""benchmarks/seq2seq_quality.py: equal parameters, and a tiny run writes its rows."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "seq2seq_quality.py"


@pytest.fixture(scope="module")
def seq2seq_quality():
    spec = importlib.util.spec_from_file_location("seq2seq_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the script's dataclass looks its module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_families_have_equal_parameters(seq2seq_quality):
    counts = {name: seq2seq_quality.family_params(f) for name, f in seq2seq_quality.FAMILIES.items()}
    for name in ("t5", "hybrid"):
        assert abs(counts[name] / counts["mamba"] - 1) < 0.01, counts


def test_a_tiny_run_writes_the_families_rows(seq2seq_quality, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(x, y):\n    return x + y\n" * 200)
    out = tmp_path / "out"
    argv = ["--quick", "--steps", "2", "--ft-steps", "2", "--batch-size", "2", "--seq-len", "32", "--test-rows", "4",
            "--max-files", "3", "2", "--families", "hybrid", "--data", str(corpus), "--out", str(out)]
    assert seq2seq_quality.main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in record["results"]] == ["hybrid"]
    for row in record["results"]:
        assert math.isfinite(row["span_loss"]) and row["tokens"] == 2 * 2 * 32
        assert 0 <= row["exact_match"] <= 1 and 0 <= row["token_accuracy"] <= 1
        assert row["train_tokens_per_s"] > 0 and row["gen_tokens_per_s"] > 0
