"""report_to="tensorboard": the event files hold the scalars of metrics.jsonl, at the same steps, across an
interruption and a resume; without tensorboard installed the run fails before it starts, saying what to install."""

import random
import sys

import numpy as np
import pytest

from lnlm_ssm.training import TrainConfig, train
from lnlm_ssm.training.metrics import read_metrics
from run_cases import train_until_killed


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(2)
    words = "red green blue fox owl ran sat on the a big small".split()
    for i in range(3):
        (root / f"part{i}.txt").write_text("\n".join(" ".join(rng.choices(words, k=10)) for _ in range(100)))
    return root


def tiny(corpus, out, **overrides):
    fields = dict(
        preset="mamba-tiny", model={"d_model": 32, "n_layer": 2}, data=str(corpus), out=str(out), steps=4,
        batch_size=4, seq_len=32, eval_every=2, eval_batches=1, ckpt_every=100, log_every=1, backend="cpu",
        report_to="tensorboard",
    )
    return TrainConfig(**{**fields, **overrides})


def tensorboard_scalars(directory):
    """{tag: [(step, value), ...]} of the event files in ``directory``, as TensorBoard shows them."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    board = event_accumulator.EventAccumulator(str(directory))
    board.Reload()
    return {tag: [(event.step, event.value) for event in board.Scalars(tag)] for tag in board.Tags()["scalars"]}


def metrics_as_scalars(out):
    """The scalars of a run's metrics.jsonl as report_to="tensorboard" tags them (kind/name), in float32 as
    TensorBoard stores them."""
    scalars = {}
    for row in read_metrics(out / "metrics.jsonl"):
        if row["kind"] == "train":
            names = ("loss", "lr", "grad_norm", "tokens_per_s")
        elif row["kind"] == "eval":
            names = [name for name in row if name not in ("kind", "step")]
        else:
            continue
        for name in names:
            scalars.setdefault(f"{row['kind']}/{name}", []).append((row["step"], float(np.float32(row[name]))))
    return scalars


def test_the_event_files_hold_the_scalars_of_metrics_jsonl(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(tiny(corpus, out))
    expected = metrics_as_scalars(out)
    assert sorted(expected) == ["eval/eval_bpb", "eval/eval_loss", "train/grad_norm", "train/loss", "train/lr",
                                "train/tokens_per_s"]
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in expected["eval/eval_loss"]] == [2, 4]
    assert tensorboard_scalars(out / "tensorboard") == expected


def test_a_resumed_run_appends_and_each_step_shows_once(corpus, tmp_path, monkeypatch):
    """Killed after step 5 with a checkpoint of step 3, resumed to step 6: steps 4 and 5 were logged twice;
    TensorBoard shows them once, as metrics.jsonl holds them."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train_until_killed(monkeypatch, tiny(corpus, out, steps=6, ckpt_every=3), kill_before_step=5)
    train(tiny(corpus, out, steps=6, ckpt_every=3, resume=True))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per run, one directory
    expected = metrics_as_scalars(out)
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert tensorboard_scalars(out / "tensorboard") == expected


def test_a_fresh_run_hides_what_an_earlier_attempt_logged(corpus, tmp_path, monkeypatch):
    """An attempt killed before its first checkpoint, then a fresh run (other lr) in the same directory."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train_until_killed(monkeypatch, tiny(corpus, out, lr=1e-2), kill_before_step=3)
    train(tiny(corpus, out))
    assert tensorboard_scalars(out / "tensorboard") == metrics_as_scalars(out)


def test_without_tensorboard_the_run_fails_before_it_starts(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    out = tmp_path / "run"
    with pytest.raises(ImportError, match=r"report_to='tensorboard' needs .* pip install 'lnlm_ssm\[tensorboard\]'"):
        train(tiny(corpus, out))
    assert not out.exists()  # no corpus prepared, no step taken


def test_no_event_files_unless_asked(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=1, eval_every=1, report_to="none"))
    assert not (out / "tensorboard").exists()
