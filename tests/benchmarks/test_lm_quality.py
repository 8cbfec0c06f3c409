"""benchmarks/lm_quality.py: the four families are sized to the target, all train, and the JSON holds their rows."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from lnlm_ssm.models import MambaLM, preset

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lm_quality.py"
FAMILIES = ["mamba", "mamba2", "hybrid", "attention"]


@pytest.fixture(scope="module")
def lm_quality():
    spec = importlib.util.spec_from_file_location("lm_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # The script's dataclass looks its module up by name while it is being defined.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_default_sizes_match_within_two_percent(lm_quality):
    target = 4_000_000
    d_base = lm_quality.base_width(target)
    layers = {}
    for name in FAMILIES:
        family = lm_quality.FAMILIES[name]
        d_model, n_layer, params = lm_quality.size_family(family, target, d_base)
        # Counted independently: the real model's parameters (the sizing extrapolates from two depths).
        model = MambaLM(preset(family.preset, **family.fields(d_model, n_layer)), device="meta")
        assert params == sum(p.numel() for p in model.parameters())
        assert abs(params / target - 1) < 0.02, (name, d_model, n_layer, params)
        layers[name] = model.config.layer_types()
    assert set(layers["mamba"]) == {"Mamba1"}
    assert set(layers["mamba2"]) == {"Mamba2"}
    assert layers["hybrid"].count("Attention") * 4 == len(layers["hybrid"])
    assert set(layers["attention"]) == {"Attention"}


def test_tiny_run_trains_every_family(lm_quality, tmp_path, capsys):
    argv = ["--params", "150000", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2",
            "--eval-batches", "1", "--max-bytes", "60000", "--threads", "1", "--out", str(tmp_path)]
    assert lm_quality.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert list(rows) == FAMILIES
    assert results["tokens_per_model"] == 3 * 2 * 32
    for name, r in rows.items():
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        evals = [m for m in metrics if m["kind"] == "eval"]
        assert [m["step"] for m in evals] == [2, 3]
        assert r["val_bpb"] == evals[-1]["eval_bpb"] and r["val_loss"] == evals[-1]["eval_loss"]
        # With the byte tokenizer, bits per byte is the loss in bits (eos tokens carry no byte: slightly above).
        assert r["val_bpb"] >= r["val_loss"] / math.log(2)
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=0.01)
        assert [s for s, _ in r["curve"]["train"]] == [1, 2, 3]
        assert r["tokens"] == 3 * 2 * 32 and r["tokens_per_s"] > 0 and r["wall_s"] > 0
        assert r["params"] == sum(p.numel() for p in MambaLM.from_pretrained(tmp_path / name / "model").parameters())
        assert 0 < r["train_loss"] < 10
        # The trained model again, in fp32 and quantised, on the same held-out windows.
        bpb = r["quantized_bpb"]
        assert list(bpb) == ["fp32", "int8", "bf16"]
        assert bpb["fp32"] == pytest.approx(r["val_bpb"], rel=1e-5)
        assert bpb["int8"] != bpb["fp32"] and bpb["int8"] == pytest.approx(bpb["fp32"], rel=0.05)
        assert bpb["bf16"] == pytest.approx(bpb["fp32"], rel=0.05)
    out = capsys.readouterr().out
    assert "int8 bpb" in out and "bf16 bpb" in out
    if importlib.util.find_spec("matplotlib") is not None:  # optional
        assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (tmp_path / "loss_curves.png").exists() and "matplotlib not installed" in out
    assert all(f"\n{name} " in out for name in FAMILIES)


def test_no_quantized_evaluation_when_asked_for_none(lm_quality, tmp_path, capsys):
    argv = ["--params", "150000", "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
            "--max-bytes", "60000", "--threads", "1", "--families", "mamba", "--quantize", "--out", str(tmp_path)]
    assert lm_quality.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["quantized_bpb"] == {}
    assert "int8 bpb" not in capsys.readouterr().out


def test_bad_arguments_are_named(lm_quality, tmp_path, capsys):
    (tmp_path / "mamba").mkdir()
    for argv, expected in (
        (["--families", "mamba,rwkv"], "--families takes a comma list of"),
        (["--steps", "0"], "--steps: expected a positive integer; got '0'"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--families", "mamba"], "already holds runs of ['mamba']"),
    ):
        with pytest.raises(SystemExit):
            lm_quality.main([*argv, "--out", str(tmp_path)])
        assert expected in capsys.readouterr().err
