"""benchmarks/model_speed.py runs end to end on tiny models, beside HF's when transformers is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "model_speed.py"
MEASURES = ["prefill", "decode_b1", "decode_b1_unfused", "decode_b8", "decode_b8_unfused", "train"]


@pytest.fixture(scope="module")
def model_speed():
    spec = importlib.util.spec_from_file_location("model_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run(model_speed, tmp_path):
    have_hf = importlib.util.find_spec("transformers") is not None
    argv = ["--quick", "--threads", "1", "--out", str(tmp_path)] + ([] if have_hf else ["--no-hf"])
    assert model_speed.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    # Every measure in fp32; the decode measures again quantised, for mamba-130m (the default --quantize-presets).
    quantized = [("mamba-130m", w, m) for w in ("int8", "bf16") for m in MEASURES if m.startswith("decode")]
    expected = [(p, "fp32", m) for p in model_speed.PRESETS for m in MEASURES]
    expected[len(MEASURES):len(MEASURES)] = quantized
    assert [(r["preset"], r["weights"], r["measure"]) for r in rows] == expected
    for r in rows:
        assert r["ours_tok_s"] > 0 and r["bound_tok_s"] > 0
        # HF has Mamba-1 and Mamba-2 models but no class for our hybrid layout.
        assert (r["hf_tok_s"] is not None) == (have_hf and r["preset"] != "hybrid-130m"), r
        assert r["hf_tok_s"] is None or r["hf_tok_s"] > 0
    # Decode is weight-bandwidth bound: batch 8 reads the weights once for 8 tokens.
    if importlib.util.find_spec("matplotlib") is not None:  # optional
        assert (tmp_path / "model_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert any("matplotlib not installed" in n for n in results["notes"])
    # Each decode row's bound is its batch's tokens at the copy bandwidth measured beside it.
    for r in rows:
        if r["measure"].startswith("decode"):
            batch = 8 if "_b8" in r["measure"] else 1
            assert r["copy_gbps"] > 0
            assert r["bound_tok_s"] == pytest.approx(batch * r["copy_gbps"] * 1e9 / r["weight_bytes"])
            assert len(r["rounds"]) == r["ours_runs"]
            assert sorted(x["copy_gbps"] for x in r["rounds"])[len(r["rounds"]) // 2] == r["copy_gbps"]
    # The per-layer breakdown of a fused decode step.
    breakdown = results["breakdown"]
    for name in model_speed.PRESETS:
        layers = breakdown[name]["layers"]
        assert [layer["layer"] for layer in layers] == list(range(4))
        for layer in layers:
            assert layer["weight_bytes"] > 0 and layer["streamed_s"] > 0
            assert layer["fused_s"] > 0 and layer["unfused_s"] > 0
        assert breakdown[name]["lm_head"]["weight_bytes"] == 4 * 64 * 304  # the real vocabulary's rows, fp32
        parts = sum(layer["fused_s"] for layer in layers) + breakdown[name]["lm_head"]["s"]
        assert 0 < parts < breakdown[name]["step_s"]
    # A quantised model's bound is its own: fewer weight bytes, measured against HF's fp32.
    nbytes = {r["weights"]: r["weight_bytes"] for r in rows if r["preset"] == "mamba-130m" and r["measure"] == "decode_b1"}
    assert nbytes["fp32"] > nbytes["bf16"] > nbytes["int8"]
    hf = {r["weights"]: r["hf_tok_s"] for r in rows if r["preset"] == "mamba-130m" and r["measure"] == "decode_b1"}
    assert hf["int8"] == hf["bf16"] == hf["fp32"]


def test_no_quantized_rows_when_asked_for_none(model_speed, tmp_path):
    argv = ["--quick", "--threads", "1", "--no-hf", "--presets", "mamba-130m", "--decode-batch", "1", "--quantize",
            "--out", str(tmp_path)]
    assert model_speed.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["weights"] for r in rows} == {"fp32"}


def test_bad_arguments_are_named(model_speed, capsys):
    with pytest.raises(SystemExit):
        model_speed.main(["--train-seqlen", "0"])
    assert "--train-seqlen must be >= 1" in capsys.readouterr().err
