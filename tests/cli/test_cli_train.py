"""``lnlm-ssm train`` and ``python -m lnlm_ssm.train``: flags, TOML configs, and a whole tiny run."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lnlm_ssm.cli import main
from lnlm_ssm.training.config import TrainConfig, TrainConfigError, add_arguments, config_from_args
from lnlm_ssm.training.metrics import read_metrics
from lnlm_ssm.utils.testing import assert_close

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (root / f"doc{i}.md").write_text("".join(f"line {j} of document {i}: hello world.\n" for j in range(60)))
    return root


def tiny_flags(corpus, out):
    return [
        "--preset", "mamba-tiny", "--model", "d_model=32", "--model", "n_layer=2", "--data", str(corpus),
        "--out", str(out), "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--backend", "cpu",
    ]


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_train_then_generate(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_flags(corpus, out), "--steps", "3", "--eval-every", "3"]) == 0
    stdout, stderr = capsys.readouterr()
    assert "trained 3 steps" in stdout and "bits/byte" in stdout
    assert "step 3/3" in stderr  # the progress bar
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]
    assert main(["generate", "--model", str(out / "model"), "--prompt", "line", "--max-new-tokens", "4",
                 "--seed", "0"]) == 0


def test_errors_exit_with_status_2_and_a_message(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_flags(corpus, out), "--steps", "1", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", *tiny_flags(corpus, out), "--batch-size", "3", "--grad-accum", "2"]) == 2
    assert "multiple of grad_accum" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("stpes = 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown keys ['stpes']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--model", "n_layer"])
    assert "KEY=VALUE" in capsys.readouterr().err


def test_report_to_tensorboard_is_a_flag_and_needs_tensorboard(corpus, tmp_path, capsys, monkeypatch):
    assert parse(["--report-to", "tensorboard"]).report_to == "tensorboard" and parse([]).report_to == "none"
    with pytest.raises(SystemExit):
        parse(["--report-to", "wandb"])
    assert "invalid choice: 'wandb'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    assert main(["train", *tiny_flags(corpus, tmp_path / "run"), "--steps", "1", "--report-to", "tensorboard"]) == 2
    assert "pip install 'lnlm_ssm[tensorboard]'" in capsys.readouterr().err


def test_flags_override_the_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'preset = "mamba2-tiny"\nsteps = 5\nlr = 1e-3\nbetas = [0.8, 0.9]\nresume = true\n'
        '[model]\nn_layer = 2\nd_model = 64\n'
    )
    config = parse(["--config", str(path), "--lr", "2e-3", "--model", "d_model=32", "--no-resume", "--seq-len", "64"])
    expected = TrainConfig(
        preset="mamba2-tiny", steps=5, lr=2e-3, betas=(0.8, 0.9), resume=False, seq_len=64,
        model={"n_layer": 2, "d_model": 32},
    )
    assert config == expected
    assert TrainConfig.from_toml(path) == TrainConfig(
        preset="mamba2-tiny", steps=5, lr=1e-3, betas=(0.8, 0.9), resume=True, model={"n_layer": 2, "d_model": 64}
    )
    # Without --config the flags alone, on the defaults.
    assert parse(["--steps", "7", "--model", 'ssm_cfg={"layer": "Mamba2"}', "--model", "layer_pattern=MMA"]) == (
        TrainConfig(steps=7, model={"ssm_cfg": {"layer": "Mamba2"}, "layer_pattern": "MMA"})
    )
    assert TrainConfig(**expected.to_dict()) == expected


@pytest.mark.parametrize(
    "text, match",
    [
        ("steps = 3\nwarmup = 2\n", r"unknown keys \['warmup'\]"),
        ('steps = "3"\n', "steps must be int"),
        ("model = 3\n", r"\[model\] table"),
        ("steps = [\n", "not valid TOML"),
    ],
)
def test_bad_toml_files_are_named(tmp_path, text, match):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(TrainConfigError, match=match) as info:
        TrainConfig.from_toml(path)
    assert "run.toml" in str(info.value) or "steps must be" in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        TrainConfig.from_toml(tmp_path / "missing.toml")


def test_python_dash_m_lnlm_ssm_train(corpus, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lnlm_ssm.train", *tiny_flags(corpus, out), "--steps", "2", "--eval-every", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "trained 2 steps" in proc.stdout
    assert (out / "model" / "config.json").is_file() and (out / "checkpoints" / "step-00000002.pt").is_file()


@pytest.mark.slow
def test_torchrun_ddp_resumes_a_single_process_run_with_the_same_losses(corpus, tmp_path):
    """3 steps in one process, then 3 more in two DDP processes, equal 6 steps in one process.

    Not bit for bit: DDP sums the two halves' gradients in another order than one process does.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    flags = [*tiny_flags(corpus, tmp_path / "split"), "--eval-every", "3", "--ckpt-every", "3"]
    assert main(["train", *tiny_flags(corpus, tmp_path / "whole"), "--steps", "6", "--eval-every", "3"]) == 0
    assert main(["train", *flags, "--steps", "3"]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "lnlm_ssm.train", *flags, "--steps", "6", "--resume", "--distributed", "ddp"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    whole, split = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("whole", "split"))
    assert [(r["kind"], r["step"]) for r in split] == [(r["kind"], r["step"]) for r in whole]
    values = [[r["loss" if r["kind"] == "train" else "eval_loss"] for r in rows] for rows in (split, whole)]
    assert_close(torch.tensor(values[0]), torch.tensor(values[1]), torch.float32)
