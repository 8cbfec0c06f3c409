"""Distributed training: 2 CPU processes under torchrun (gloo) train as one process does on the same global batch.

Launched workers: ``_dist_worker.py`` (the distributed API on its own) and
``python -m lnlm_ssm.train`` (the training loop). Both are compared with the
same training in this process, where ``setup()`` finds no torchrun environment.
"""

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lnlm_ssm.models import MambaLM, MambaLMConfig, preset
from lnlm_ssm.training.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup,
    full_state_dicts,
    is_main,
    load_full_state_dicts,
    setup,
    wrap_model,
)
from lnlm_ssm.utils.testing import assert_close

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend (this torch build has none)",
)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _dist_worker as worker  # noqa: E402

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun(*args: str, timeout: float = 150) -> None:
    """Run ``args`` in 2 processes; --standalone picks a free port, so tests do not collide."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"  # 2 processes on 2 cores
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-6000:]}")


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


# -- a single process ----------------------------------------------------------------------------


def test_setup_without_torchrun_is_one_process(no_torchrun_env):
    info = setup()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    assert setup() == info and is_main(info) and not dist.is_initialized()
    barrier(info)
    cleanup(info)
    x = torch.tensor([1.0, 2.0])
    mean = all_reduce_mean(x, info)
    assert torch.equal(mean, x) and mean.data_ptr() != x.data_ptr()


def test_part_of_torchrun_env_is_an_error(no_torchrun_env, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        setup()


def test_bad_torchrun_env_is_an_error(monkeypatch):
    for name, value in dict(RANK="2", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="x", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        setup()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK must be an integer; got 'one'"):
        setup()


def tiny_model():
    return MambaLM(preset("mamba-tiny", **worker.CONFIG))


def test_wrap_model_errors(no_torchrun_env):
    info = setup()
    model = tiny_model()
    assert wrap_model(model, "none", info) is model
    for mode in ("ddp", "fsdp"):
        with pytest.raises(ValueError, match=f"mode='{mode}' needs a process group: launch with `torchrun"):
            wrap_model(model, mode, info)
    with pytest.raises(ValueError, match=r"mode must be one of \('none', 'ddp', 'fsdp'\), got 'zero3'"):
        wrap_model(model, "zero3", info)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got dict"):
        wrap_model({}, "none", info)
    with pytest.raises(TypeError, match="info must be the DistInfo that setup"):
        wrap_model(model, "none", None)
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor; got float"):
        all_reduce_mean(1.0, info)


def test_full_state_dicts_round_trip_in_one_process(no_torchrun_env):
    info = setup()
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = worker.make_data(1)[0]
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    model_sd, optim_sd = full_state_dicts(model, optimizer, info)
    assert list(model_sd) == list(model.state_dict())
    assert all(torch.equal(model_sd[k], v) for k, v in model.state_dict().items())
    assert full_state_dicts(model, None, info)[1] is None
    taken = {k: v.clone() for k, v in model_sd.items()}

    torch.manual_seed(1)
    other = tiny_model()
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-2)
    load_full_state_dicts(other, other_optimizer, model_sd, optim_sd, info)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())
    # The next step from the loaded state is the next step of the original.
    for m, opt in ((model, optimizer), (other, other_optimizer)):
        opt.zero_grad()
        m(batch, labels=batch).loss.backward()
        opt.step()
    assert all(torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())
    # The dicts are a snapshot: training on changed neither them nor the other optimizer's state.
    assert all(torch.equal(model_sd[k], v) for k, v in taken.items())
    assert optim_sd["state"]["backbone.norm_f.weight"]["step"].item() == 1
    with pytest.raises(ValueError, match="give both optimizer and optim_sd, or neither"):
        load_full_state_dicts(other, other_optimizer, model_sd, None, info)


# -- two processes: the distributed API -----------------------------------------------------------


@pytest.fixture(scope="module")
def single_process_run():
    saved = {name: os.environ.pop(name) for name in TORCHRUN_ENV if name in os.environ}
    try:
        torch.manual_seed(0)
        return worker.run("none", steps=4, resume_at=2, info=setup())
    finally:
        os.environ.update(saved)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_as_one_on_the_same_global_batch(mode, single_process_run, tmp_path):
    torchrun(str(HERE / "_dist_worker.py"), "--mode", mode, "--out", str(tmp_path), "--steps", "4", "--resume-at", "2")
    ours = torch.load(tmp_path / "result-0.pt", weights_only=False)
    other_rank = torch.load(tmp_path / "result-1.pt", weights_only=False)
    ref = single_process_run

    # The loss is a float32 cross entropy (MambaLM casts the logits) of float64 logits that
    # differ only by the order of the gradient sums, so float32's tolerance.
    assert_close(torch.tensor(ours["losses"]), torch.tensor(ref["losses"]), torch.float32)
    assert ours["losses"] == other_rank["losses"]  # all_reduce_mean gives every rank the global loss
    # Full state dicts: rank 0 only, under the plain model's keys, loadable in one process.
    assert other_rank["model_sd"] == {} and other_rank["optim_sd"] == {}
    assert list(ours["model_sd"]) == list(tiny_model().state_dict())
    for key, value in ref["model_sd"].items():
        assert_close(ours["model_sd"][key], value, msg=key)  # float64: AdamW's round-off growth stays far below
    for key, value in ours["reported"].items():  # what the wrapped model holds, gathered on every rank
        assert torch.equal(ours["model_sd"][key], value) and torch.equal(other_rank["reported"][key], value), key

    plain = MambaLM(preset("mamba-tiny", **worker.CONFIG), dtype=worker.DTYPE)
    plain.load_state_dict(ours["model_sd"])
    with torch.no_grad():
        logits = plain(worker.probe_batch()).logits
    assert_close(logits, ours["probe_logits"])
    assert_close(ours["probe_logits"], ref["probe_logits"])
    # Adam's moments came through the resume at step 2 and the final gathering intact.
    ref_state, our_state = ref["optim_sd"]["state"], ours["optim_sd"]["state"]
    assert set(our_state) == set(ref_state)
    for name, moments in ref_state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(our_state[name][key], moments[key], msg=f"{name} {key}")


# -- two processes: the training loop ------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the a cat dog bird sat ran on to under mat house tree big small red".split()
    for i in range(2):
        (root / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(80)))
    return root


LOOP_FLAGS = dict(
    preset="mamba-tiny", steps=4, batch_size=4, seq_len=32, eval_every=2, eval_batches=2, ckpt_every=4,
    log_every=1, backend="cpu", dtype="fp32", lr=1e-2,
)
LOOP_MODEL = {"d_model": 32, "n_layer": 2}


def loop_rows(out):
    from lnlm_ssm.training.metrics import read_metrics

    rows = read_metrics(out / "metrics.jsonl")
    return [r["loss"] for r in rows if r["kind"] == "train"], [r["eval_loss"] for r in rows if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def single_process_loop(corpus, tmp_path_factory):
    loop = pytest.importorskip("lnlm_ssm.training.loop", reason="the training loop is not in this checkout")
    from lnlm_ssm.training.config import TrainConfig

    out = tmp_path_factory.mktemp("single") / "run"
    saved = {name: os.environ.pop(name) for name in TORCHRUN_ENV if name in os.environ}
    try:
        loop.train(TrainConfig(**LOOP_FLAGS, model=LOOP_MODEL, data=str(corpus), out=str(out)))
    finally:
        os.environ.update(saved)
    return loop_rows(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_train_under_torchrun_logs_the_single_process_losses(mode, corpus, single_process_loop, tmp_path):
    from lnlm_ssm.training.state import latest_checkpoint, load_checkpoint

    out = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in LOOP_FLAGS.items()]
    flags += [f"--model={k}={v}" for k, v in LOOP_MODEL.items()]
    torchrun("-m", "lnlm_ssm.train", *flags, f"--data={corpus}", f"--out={out}", f"--distributed={mode}")

    losses, eval_losses = loop_rows(out)
    ref_losses, ref_eval = single_process_loop
    assert len(losses) == LOOP_FLAGS["steps"] and len(eval_losses) == len(ref_eval) == 2
    # fp32 throughout; the runs differ only in the order of the gradient and loss sums.
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), torch.float32)
    assert_close(torch.tensor(eval_losses), torch.tensor(ref_eval), torch.float32)

    # The checkpoint written by rank 0 holds full tensors under the plain keys: a single
    # process loads it, and it is the model the run exported.
    state = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    model = MambaLM(MambaLMConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    exported = MambaLM.from_pretrained(out / "model")
    for key, value in exported.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_electra_pretraining_trains_under_torchrun(mode, corpus, tmp_path):
    """ELECTRA's pass (generator, sampling, discriminator) is one forward, so DDP and FSDP wrap it as any model.

    Ranks mask different positions (their draws are seeded by rank), so the losses are not one process's.
    """
    from lnlm_ssm import ElectraPretraining

    out = tmp_path / "run"
    flags = {**LOOP_FLAGS, "preset": "electra-tiny", "objective": "electra", "steps": 2, "eval_every": 2}
    disc = '{"d_model": 32, "n_layer": 1, "num_heads": 2, "d_intermediate": 64}'
    torchrun("-m", "lnlm_ssm.train", *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()],
             f"--model=discriminator={disc}", f"--data={corpus}", f"--out={out}", f"--distributed={mode}")
    from lnlm_ssm.training.metrics import read_metrics

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert all(math.isfinite(r["eval_disc_loss"]) for r in rows if r["kind"] == "eval")
    assert isinstance(ElectraPretraining.from_pretrained(out / "model"), ElectraPretraining)
