"""benchmarks/encoder_quality.py: every family trains under the same settings, parameter counts are near
each other, and the JSON holds the table, the throughput rows and the HF comparison."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "encoder_quality.py"


@pytest.fixture(scope="module")
def encoder_quality():
    spec = importlib.util.spec_from_file_location("encoder_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the script's dataclass looks its module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_depth_matched_families_are_within_fifteen_percent_of_bert(encoder_quality):
    counts = {name: encoder_quality.family_params(f, 261) for name, f in encoder_quality.FAMILIES.items()}
    for name in ("bimamba", "hydra", "albert"):
        assert abs(counts[name] / counts["bert"] - 1) < 0.15, counts


def test_a_small_run_trains_each_family_and_writes_its_rows(encoder_quality, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 40)
    out = tmp_path / "out"
    argv = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--lrs", "1e-3", "3e-3",
            "--families", "hydra,electra", "--skip-speed", "--data", str(corpus), "--out", str(out)]
    assert encoder_quality.main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in record["results"]] == ["hydra", "electra"]
    assert len(record["tried"]) == 4  # each family at each lr
    for row in record["results"]:
        assert math.isfinite(row["val_loss"]) and 0 <= row["val_accuracy"] <= 1 and row["tokens"] == 2 * 2 * 32
    electra = record["results"][1]
    assert electra["disc_loss"] is not None and record["results"][0]["disc_loss"] is None
    best = min((r for r in record["tried"] if r["model"] == "hydra"), key=lambda r: r["val_loss"])
    assert record["results"][0]["lr"] == best["lr"]


@pytest.mark.slow
def test_throughput_and_hf_rows(encoder_quality, tmp_path):
    args = type("Args", (), dict(seqlens=[64], repeats=1, speed_preset_layers=1, seed=0, hf_batch=1, hf_seq_len=32))
    rows = encoder_quality.forward_throughput(args)
    assert [r["model"] for r in rows] == ["bert-110m", "bimamba-110m", "hydra-110m"]
    hf = encoder_quality.against_hf(args)
    assert hf["max_abs_logit_diff"] < 1e-3 and hf["speedup"] > 0
