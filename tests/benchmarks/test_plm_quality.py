"""benchmarks/plm_quality.py: the three losses are the models' own losses over the same positions, and a small
run trains every family and writes its rows."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lnlm_ssm.data.permutation import xlnet_inputs
from lnlm_ssm.models import preset, preset_architecture

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "plm_quality.py"
TINY = {"d_model": 32, "n_layer": 2, "vocab_size": 261}


@pytest.fixture(scope="module")
def plm_quality():
    spec = importlib.util.spec_from_file_location("plm_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the script's dataclass looks its module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _model(name: str, **fields):
    torch.manual_seed(0)
    return preset_architecture(name).model_class(preset(name, **fields)).eval()


def test_losses_match_each_models_own_loss_on_the_same_positions(plm_quality):
    seq_len = 20
    start, length = plm_quality.middle(seq_len)
    assert (start, length) == (8, 4)
    batch = torch.randint(0, 261, (2, seq_len), generator=torch.Generator().manual_seed(1))
    middle_only = torch.full_like(batch, -100)
    middle_only[:, start : start + length] = batch[:, start : start + length]

    clm = _model("mamba-tiny", **TINY)
    scores = plm_quality.evaluate(clm, [batch])
    with torch.no_grad():
        assert scores["l2r_loss"] == pytest.approx(clm(batch, labels=batch).loss.item(), rel=1e-5)
        # Left to right, the middle is predicted from the prefix: the model's loss on the middle's labels.
        assert scores["mid_prefix_loss"] == pytest.approx(clm(batch, labels=middle_only).loss.item(), rel=1e-5)
    assert scores["infill_loss"] == scores["mid_prefix_loss"] and scores["infill_context"] == "prefix only"
    assert scores["l2r_tokens"] == 2 * (seq_len - 1) and scores["infill_tokens"] == 2 * length

    plm = _model("mamba-plm-tiny", **TINY, max_positions=seq_len)
    with torch.no_grad():  # positions that matter at initialisation: the orders give clearly different losses
        plm.position_in.weight.mul_(20)
        plm.position_target.weight.mul_(20)
    scores = plm_quality.evaluate(plm, [batch])
    order = torch.tensor([*range(start), *range(start + length, seq_len), *range(start, start + length)])
    with torch.no_grad():
        assert scores["l2r_loss"] == pytest.approx(plm(batch, labels=batch).loss.item(), rel=1e-5)
        # Prefix, suffix, then the middle: only the middle's labels count.
        assert scores["infill_loss"] == pytest.approx(plm(batch, order, labels=middle_only).loss.item(), rel=1e-5)
        assert scores["infill_loss"] != pytest.approx(plm(batch, labels=middle_only).loss.item(), rel=1e-3)
    assert scores["infill_context"] == "prefix + suffix"

    xlnet = _model("xlnet-tiny", d_model=32, n_layer=2, n_head=2, d_inner=64)
    scores = plm_quality.evaluate(xlnet, [batch])
    targets = torch.zeros_like(batch, dtype=torch.bool)
    targets[:, start : start + length] = True
    drawn = xlnet_inputs(batch, targets, order.expand(2, seq_len))
    with torch.no_grad():
        loss = xlnet(batch, perm_mask=drawn.perm_mask, target_mapping=drawn.target_mapping, labels=drawn.labels).loss
        assert scores["infill_loss"] == pytest.approx(loss.item(), rel=1e-5)
        # The identity factorisation: every position from 1 on a target, each seeing only the positions before it.
        after_first = torch.ones_like(targets)
        after_first[:, 0] = False
        drawn = xlnet_inputs(batch, after_first, torch.arange(seq_len).expand(2, seq_len))
        out = xlnet(batch, perm_mask=drawn.perm_mask, target_mapping=drawn.target_mapping, labels=drawn.labels)
        assert scores["l2r_loss"] == pytest.approx(out.loss.item(), rel=1e-5)
        changed = batch.clone()
        changed[:, 10] = (changed[:, 10] + 1) % 261
        again = xlnet(changed, perm_mask=drawn.perm_mask, target_mapping=drawn.target_mapping).logits
    # Row t - 1 predicts position t: those up to 10 do not read the token at 10, those after it do.
    torch.testing.assert_close(again[:, :10], out.logits[:, :10], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(again[:, 10:], out.logits[:, 10:], rtol=1e-5, atol=1e-5)
    assert math.isfinite(scores["l2r_loss"]) and scores["infill_context"] == "prefix + suffix"


def test_a_small_run_trains_each_family_and_writes_its_rows(plm_quality, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 40)
    out = tmp_path / "out"
    argv = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--lrs", "1e-3", "3e-3",
            "--families", "mamba-clm,mamba-plm,xlnet-plm", "--threads", "1", "--data", str(corpus), "--out", str(out)]
    assert plm_quality.main(argv) == 0
    record = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in record["results"]}
    assert list(rows) == ["mamba-clm", "mamba-plm", "xlnet-plm"]
    assert len(record["tried"]) == 6  # each family at each lr
    for name, row in rows.items():
        assert row["tokens"] == 2 * 2 * 16
        assert all(math.isfinite(row[k]) for k in ("l2r_loss", "mid_prefix_loss", "infill_loss"))
        tried = [r for r in record["tried"] if r["model"] == name]
        assert row["objective_val_loss"] == min(r["objective_val_loss"] for r in tried)
    # The causal LM's own held-out loss is its left-to-right loss (the same windows, the same positions).
    assert rows["mamba-clm"]["objective_val_loss"] == pytest.approx(rows["mamba-clm"]["l2r_loss"], rel=1e-5)
    assert rows["mamba-clm"]["suffix_gain"] == 0 and rows["mamba-plm"]["infill_context"] == "prefix + suffix"
    assert rows["mamba-plm"]["params"] == rows["mamba-clm"]["params"] + 2 * 16 * 128  # the two position tables
    if importlib.util.find_spec("matplotlib") is not None:  # optional
        assert (out / "plm_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_named(plm_quality, tmp_path, capsys):
    (tmp_path / "x").write_text("")
    for argv, expected in (
        (["--families", "mamba-clm,rwkv"], "--families takes a comma list of"),
        (["--seq-len", "8"], "--seq-len must be >= 10"),
        (["--lrs", "0"], "a learning rate must be > 0"),
        ([], "is not empty"),
    ):
        with pytest.raises(SystemExit):
            plm_quality.main([*argv, "--out", str(tmp_path)])
        assert expected in capsys.readouterr().err
