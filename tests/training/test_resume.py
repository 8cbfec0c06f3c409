"""Training checkpoints: a resumed run repeats an uninterrupted one exactly; keep_last; atomic saves;
corrupt, missing and mismatched checkpoints are errors that name the file."""

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lnlm_ssm.training import TrainCheckpointError, TrainConfig, TrainConfigError, train
from lnlm_ssm.training import state as ckpt
from lnlm_ssm.training.metrics import read_metrics
from run_cases import train_until_killed

TINY_MODEL = {"d_model": 32, "n_layer": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    words = "one two three four five six seven eight nine ten and or not".split()
    for i in range(3):
        (root / f"part{i}.txt").write_text("\n".join(" ".join(rng.choices(words, k=10)) for _ in range(120)))
    return root


def tiny(corpus, out, **overrides):
    fields = dict(
        preset="mamba-tiny", model=TINY_MODEL, data=str(corpus), out=str(out), steps=12, batch_size=4, seq_len=32,
        eval_every=4, eval_batches=1, ckpt_every=6, log_every=1, warmup_steps=3, backend="cpu",
    )
    return TrainConfig(**{**fields, **overrides})


def rows(out, kind):
    """(step, loss) of the train or eval rows of a run's metrics.jsonl."""
    found = read_metrics(out / "metrics.jsonl")
    return [(r["step"], r["loss"] if kind == "train" else r["eval_loss"]) for r in found if r["kind"] == kind]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """An uninterrupted run of 12 steps."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny(corpus, out))
    return out


@pytest.mark.parametrize("kill_before_step", [6, 9])
def test_resumed_run_repeats_the_uninterrupted_one_exactly(corpus, straight, tmp_path, monkeypatch, kill_before_step):
    resumed = tmp_path / "resumed"
    train_until_killed(monkeypatch, tiny(corpus, resumed), kill_before_step)
    # Killed after step 6 or 9, the run keeps its checkpoint of step 6 and the rows it logged.
    assert [p.name for _, p in ckpt.list_checkpoints(resumed / "checkpoints")] == ["step-00000006.pt"]
    assert rows(resumed, "train")[-1][0] == kill_before_step
    result = train(tiny(corpus, resumed, resume=True))

    # Bit for bit: the same weights, optimizer state, learning rates, batches and kernels on the
    # same number of threads give the same floating-point operations in the same order.
    assert rows(resumed, "train") == rows(straight, "train")
    assert rows(resumed, "eval") == rows(straight, "eval")
    assert [s for s, _ in rows(resumed, "train")] == list(range(1, 13))  # the killed run's extra rows are gone
    assert result["step"] == 12 and result["tokens"] == 12 * 4 * 32
    a, b = (load_file(d / "model" / "model.safetensors") for d in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_last_and_no_stray_files(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=8, ckpt_every=2, keep_last=2, eval_every=8))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006.pt", "step-00000008.pt"]
    state = ckpt.load_checkpoint(out / "checkpoints" / "step-00000008.pt")
    assert state["format_version"] == ckpt.FORMAT_VERSION and state["step"] == 8
    assert state["config"] == tiny(corpus, out, steps=8, ckpt_every=2, keep_last=2, eval_every=8).to_dict()
    assert state["progress"] == {"tokens": 8 * 4 * 32}


@pytest.fixture
def finished_run(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=2, ckpt_every=1, eval_every=2))
    return out


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_a_checkpoint", "future_version"])
def test_a_damaged_newest_checkpoint_is_an_error_naming_it(corpus, finished_run, damage):
    newest = finished_run / "checkpoints" / "step-00000002.pt"
    if damage == "truncate":
        data = newest.read_bytes()
        newest.write_bytes(data[: len(data) // 2])
        match = "corrupt or incomplete"
    elif damage == "garbage":
        newest.write_bytes(b"\x00not a checkpoint" * 10)
        match = "corrupt or incomplete"
    elif damage == "not_a_checkpoint":
        torch.save({"step": 2}, newest)
        match = "is missing"
    else:
        state = torch.load(newest, weights_only=True)
        torch.save({**state, "format_version": ckpt.FORMAT_VERSION + 1}, newest)
        match = "format_version"
    with pytest.raises(TrainCheckpointError, match=match) as info:
        train(tiny(corpus, finished_run, steps=4, resume=True))
    assert str(newest) in str(info.value)


def test_resume_needs_a_checkpoint_and_a_fresh_run_an_empty_directory(corpus, finished_run, tmp_path):
    with pytest.raises(TrainCheckpointError, match="nothing to resume: no checkpoint in"):
        train(tiny(corpus, tmp_path / "empty", resume=True))
    with pytest.raises(TrainCheckpointError, match="already holds checkpoints .* pass --resume"):
        train(tiny(corpus, finished_run, steps=4))
    with pytest.raises(TrainConfigError, match="is at step 2 and the run asks for 2 steps: give a larger --steps"):
        train(tiny(corpus, finished_run, steps=2, resume=True))


def test_resume_with_another_model_or_data_is_an_error(corpus, finished_run):
    with pytest.raises(TrainCheckpointError, match=r"different model; .*'n_layer': \(2, 3\)"):
        train(tiny(corpus, finished_run, steps=4, resume=True, model={**TINY_MODEL, "n_layer": 3}))
    with pytest.raises(TrainCheckpointError, match=r"different data settings; .*'seq_len': \(32, 16\)"):
        train(tiny(corpus, finished_run, steps=4, resume=True, seq_len=16))


def test_checkpoints_record_the_objective_and_resume_refuses_another(corpus, finished_run):
    newest = finished_run / "checkpoints" / "step-00000002.pt"
    state = torch.load(newest, weights_only=True)
    assert state["objective"] == "clm"
    # A checkpoint of another objective (as a masked-LM run will write) cannot be resumed as this one.
    torch.save({**state, "objective": "mlm"}, newest)
    with pytest.raises(TrainCheckpointError, match="trained with the objective 'mlm' and this run asks for 'clm'"):
        train(tiny(corpus, finished_run, steps=4, resume=True))


def test_checkpoints_from_before_objectives_resume_as_causal_lm(corpus, finished_run):
    newest = finished_run / "checkpoints" / "step-00000002.pt"
    state = torch.load(newest, weights_only=True)
    del state["objective"]
    torch.save(state, newest)
    assert train(tiny(corpus, finished_run, steps=3, resume=True))["step"] == 3


def test_resume_can_extend_a_finished_run(corpus, finished_run):
    result = train(tiny(corpus, finished_run, steps=3, ckpt_every=1, eval_every=3, resume=True))
    assert result["step"] == 3
    assert [s for s, _ in rows(finished_run, "train")] == [1, 2, 3]


def test_save_is_atomic(tmp_path, monkeypatch):
    state = {k: {} for k in ckpt.REQUIRED_KEYS if k != "format_version"}
    first = ckpt.save_checkpoint(tmp_path, {**state, "step": 1}, keep_last=3)

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, {**state, "step": 2}, keep_last=3)
    assert sorted(tmp_path.iterdir()) == [first]
    assert ckpt.latest_checkpoint(tmp_path) == first
    with pytest.raises(ValueError, match="missing"):
        ckpt.save_checkpoint(tmp_path, {"step": 3}, keep_last=1)
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.save_checkpoint(tmp_path, {**state, "step": 3}, keep_last=0)


def test_rng_states_round_trip():
    state = ckpt.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5)
    np.random.rand(5)
    random.random()
    ckpt.restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]


@pytest.mark.parametrize(
    "objective, preset, model",
    [
        ("mlm", "hydra-tiny", {"d_model": 32, "n_layer": 1, "num_heads": 2}),
        ("electra", "electra-tiny", {"discriminator": {"d_model": 32, "n_layer": 1, "num_heads": 2, "d_intermediate": 64}}),
    ],
)
def test_a_resumed_encoder_run_masks_and_samples_as_the_uninterrupted_one(
    corpus, tmp_path, monkeypatch, objective, preset, model
):
    config = dict(objective=objective, preset=preset, model=model, steps=6, ckpt_every=3, eval_every=3)
    straight_run = tmp_path / "straight"
    train(tiny(corpus, straight_run, **config))
    resumed = tmp_path / "resumed"
    train_until_killed(monkeypatch, tiny(corpus, resumed, **config), 5)
    train(tiny(corpus, resumed, resume=True, **config))
    assert rows(resumed, "train") == rows(straight_run, "train")
    assert rows(resumed, "eval") == rows(straight_run, "eval")
