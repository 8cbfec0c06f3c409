"""The training loop: the loss falls, the logs and the final model are written, the optimizer is set up as
documented, and gradient accumulation and activation checkpointing do not change what a step computes."""

import importlib.util
import io
import json
import math
import random
import re
import sys

import pytest
import torch

from lnlm_ssm.models import MambaLM
from lnlm_ssm.data import Corpus
from lnlm_ssm.data.corpus import default_corpus_dir
from lnlm_ssm.objectives import OBJECTIVES, CausalLMObjective
from lnlm_ssm.training import TrainConfig, TrainConfigError, train
from lnlm_ssm.training import config as train_config
from lnlm_ssm.training.state import latest_checkpoint, load_checkpoint
from lnlm_ssm.training.loop import lr_at, param_groups
from lnlm_ssm.training.metrics import ProgressBar, read_metrics
from lnlm_ssm.utils.testing import assert_close

TINY_MODEL = {"d_model": 32, "n_layer": 2}
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few KB of ASCII sentences from a small vocabulary, in four files (documents): easy to learn a little."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the a cat dog bird sat ran flew on to under mat house tree big small red".split()
    for i in range(4):
        lines = (" ".join(rng.choice(words) for _ in range(8)) + "." for _ in range(150))
        (root / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny(corpus, out, **overrides):
    fields = dict(
        preset="mamba-tiny", model=TINY_MODEL, data=str(corpus), out=str(out), steps=4, batch_size=4, seq_len=32,
        eval_every=2, eval_batches=2, ckpt_every=100, log_every=1, backend="cpu",
    )
    return TrainConfig(**{**fields, **overrides})


def train_losses(out):
    return [row["loss"] for row in read_metrics(out / "metrics.jsonl") if row["kind"] == "train"]


def test_loss_falls_and_the_run_writes_its_logs_and_model(corpus, tmp_path):
    out = tmp_path / "run"
    result = train(tiny(corpus, out, steps=16, eval_every=5, warmup_steps=3, lr=1e-2, min_lr=1e-3))
    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(1, 17))
    assert [r["step"] for r in eval_rows] == [5, 10, 15, 16]
    for r in train_rows:
        assert {"loss", "lr", "tokens_per_s", "grad_norm", "tokens"} <= set(r) and r["tokens_per_s"] > 0
    losses = [r["loss"] for r in train_rows]
    # Untrained, the loss is about ln(261) = 5.56; the sentences use 17 lowercase words.
    assert losses[0] > 5.0 and max(losses[-3:]) < losses[0] - 1.0, losses
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]
    # ASCII text: a byte per token, and an eos (no text) after each document.
    bytes_per_token = Corpus.open(out / "data").bytes_per_token("val")
    assert 0.95 < bytes_per_token < 1
    for r in eval_rows:
        assert r["eval_bpb"] == pytest.approx(r["eval_loss"] / math.log(2) / bytes_per_token, rel=1e-12)
    assert result["step"] == 16 and result["tokens"] == 16 * 4 * 32
    assert result["loss"] == losses[-1] and result["eval_loss"] == eval_rows[-1]["eval_loss"]
    if HAS_MATPLOTLIB:  # an optional dependency; without it, see test_without_matplotlib_...
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not (out / "loss.png").exists()

    # The exported model is the final checkpoint's weights, and loads as a MambaLM.
    model = MambaLM.from_pretrained(out / "model")
    final = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert final["step"] == 16
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final["model"][name]), name


def test_learning_rate_schedule():
    config = TrainConfig(steps=110, lr=1e-2, min_lr=1e-3, warmup_steps=10)
    lrs = [lr_at(s, config) for s in range(110)]
    assert lrs[:10] == pytest.approx([1e-2 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-2)
    assert lrs[60] == pytest.approx(1e-3 + 0.5 * 9e-3)  # half way through the decay: the mean of lr and min_lr
    assert lrs[-1] == pytest.approx(1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(10_000, config) == pytest.approx(1e-3)
    no_warmup = TrainConfig(steps=5, lr=1e-2, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, no_warmup) == pytest.approx(1e-2)


def test_logged_learning_rates_follow_the_schedule(corpus, tmp_path):
    config = tiny(corpus, tmp_path / "run", steps=4, warmup_steps=2, eval_every=4)
    train(config)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["lr"] for r in rows] == [lr_at(s, config) for s in range(4)]


def test_weight_decay_only_on_matrices_not_marked_no_weight_decay():
    model = MambaLM.from_name("hybrid-tiny", n_layer=4, d_intermediate=64)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = set(decay["params"])
    names = dict(model.named_parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert set(decay["params"]) | set(no_decay["params"]) == names.keys()
    for name, p in names.items():
        expect = p.ndim >= 2 and not name.endswith(("A_log", "D", "dt_bias"))
        assert (name in decayed) == expect, name
    assert "backbone.embedding.weight" in decayed  # tied with lm_head, listed once


def test_grad_accum_gives_the_steps_of_the_whole_batch(corpus, tmp_path):
    one = train_losses_of(corpus, tmp_path / "a", grad_accum=1)
    two = train_losses_of(corpus, tmp_path / "b", grad_accum=2)
    # Same windows, same mean loss; only the order of the sums differs.
    assert_close(torch.tensor(two), torch.tensor(one), torch.float32)


def test_activation_checkpointing_gives_the_same_steps(corpus, tmp_path):
    plain = train_losses_of(corpus, tmp_path / "a", activation_checkpointing=False)
    recomputed = train_losses_of(corpus, tmp_path / "b", activation_checkpointing=True)
    assert_close(torch.tensor(recomputed), torch.tensor(plain), torch.float32)


def train_losses_of(corpus, out, **overrides):
    train(tiny(corpus, out, steps=3, eval_every=3, **overrides))
    return train_losses(out)


def test_bf16_autocast_trains(corpus, tmp_path):
    result = train(tiny(corpus, tmp_path / "run", steps=2, eval_every=2, dtype="bf16"))
    assert math.isfinite(result["loss"]) and math.isfinite(result["eval_loss"])


def test_the_model_card_says_what_made_the_weights(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lnlm-ssm", "train", "--data", "my `corpus`", "--steps", "4"])
    out = tmp_path / "run"
    result = train(tiny(corpus, out, steps=4, eval_every=3))
    card = (out / "model" / "README.md").read_text()
    model = MambaLM.from_pretrained(out / "model")
    assert f"A MambaLM with {sum(p.numel() for p in model.parameters()):,} parameters" in card
    assert (out / "model" / "config.json").read_text().rstrip() in card
    training = card[card.index("## Training\n"):].splitlines()[2:]
    assert training == [
        f"- data: `{corpus.resolve()}`",
        "- tokenizer: `byte`",
        "- objective: `clm`",
        "- steps: 4",
        "- tokens seen: 512",  # 4 steps x 4 sequences x 32 tokens
        f"- final eval_loss: {result['eval_loss']:.6g}",
        f"- final eval_bpb: {result['eval_bpb']:.6g}",
        # Shell-quoted, in a code span that the backticks inside cannot end.
        "- command: ``lnlm-ssm train --data 'my `corpus`' --steps 4``",
    ]


def test_the_card_of_a_resumed_run_says_where_its_command_took_over(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=2, eval_every=2, ckpt_every=2))
    monkeypatch.setattr(sys, "argv", ["lnlm-ssm", "train", "--steps", "3", "--resume"])
    train(tiny(corpus, out, steps=3, eval_every=3, resume=True))
    card = (out / "model" / "README.md").read_text()
    assert "- steps: 3\n- tokens seen: 384\n" in card  # tokens of the whole run, not of the resumed part
    assert "- command (resuming at step 2): `lnlm-ssm train --steps 3 --resume`\n" in card


def test_the_card_names_the_default_corpus(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(preset="mamba-tiny", model=TINY_MODEL, out=str(out), max_bytes=20_000, steps=1, batch_size=2,
                      seq_len=16, eval_every=1, eval_batches=1, backend="cpu"))
    card = (out / "model" / "README.md").read_text()
    stdlib = f"`{default_corpus_dir()}` (the default corpus)"
    assert f"- data: the Python standard library's source, {stdlib}, its first 20,000 bytes\n" in card


def test_a_tokenizer_json_goes_with_the_model(corpus, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("the a cat dog bird sat".split())}}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|endoftext|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=1, eval_every=1, seq_len=8, tokenizer=str(tmp_path / "tokenizer.json")))
    assert json.loads((out / "model" / "tokenizer.json").read_text()) == json.loads(hf.to_str())
    assert MambaLM.from_pretrained(out / "model").config.vocab_size == len(vocab)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("steps", 0, "steps must be >= 1"),
        ("steps", "10", "steps must be int"),
        ("lr", -1.0, "lr must be > 0"),
        ("min_lr", 1.0, r"min_lr must be in \[0, lr"),
        ("betas", (0.9,), "betas must be a pair"),
        ("betas", (0.9, 1.0), r"betas must both be in \[0, 1\)"),
        ("dtype", "fp16", "dtype must be one of"),
        ("distributed", "zero", "distributed must be one of"),
        ("preset", "mamba-huge", "preset must be one of"),
        ("grad_accum", 3, "batch_size .* multiple of grad_accum"),
        ("resume", 1, "resume must be bool"),
        ("model", "n_layer=2", "model must be a table"),
        ("report_to", "wandb", "report_to must be one of"),
    ],
)
def test_bad_settings_are_named(field, value, match):
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig(**{field: value})


def test_bad_model_overrides_and_types_are_errors(corpus, tmp_path):
    with pytest.raises(TypeError, match="TrainConfig"):
        train({"steps": 1})
    with pytest.raises(ValueError, match="unknown MambaLMConfig fields"):
        train(tiny(corpus, tmp_path / "run", model={"d_modle": 32}))
    with pytest.raises(ValueError, match="vocab_size 100 is smaller than the tokenizer's 261"):
        train(tiny(corpus, tmp_path / "run", model={**TINY_MODEL, "vocab_size": 100}))


def test_an_objective_refuses_a_preset_of_a_family_it_does_not_train(corpus, tmp_path, monkeypatch):
    class EncoderOnly(CausalLMObjective):
        name = "encoder-only"
        architectures = ("Encoder",)

    monkeypatch.setitem(OBJECTIVES, EncoderOnly.name, EncoderOnly)
    monkeypatch.setitem(train_config.CHOICES, "objective", (*train_config.CHOICES["objective"], EncoderOnly.name))
    with pytest.raises(TrainConfigError, match="'encoder-only' trains Encoder models; the preset 'mamba-tiny' is a "
                                               "MambaLM"):
        train(tiny(corpus, tmp_path / "run", objective="encoder-only"))
    assert not (tmp_path / "run" / "data").exists()  # refused before the corpus is tokenised


def test_the_loop_gives_the_objective_its_tokenizer_and_evaluates_its_metrics(corpus, tmp_path, monkeypatch):
    class WithMetric(CausalLMObjective):
        name = "clm-with-metric"

        def use_tokenizer(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, model, batch):
            out = super().__call__(model, batch)
            vocab = torch.tensor(float(self.tokenizer.vocab_size))
            return type(out)(out.loss, {"twice": 2 * out.loss.detach(), "vocab": vocab})

        def eval_metrics(self, eval_loss, bytes_per_token, metrics=None):
            return {"eval_loss": eval_loss, **{f"eval_{k}": v for k, v in metrics.items()}}

    monkeypatch.setitem(OBJECTIVES, WithMetric.name, WithMetric)
    monkeypatch.setitem(train_config.CHOICES, "objective", (*train_config.CHOICES["objective"], WithMetric.name))
    train(tiny(corpus, tmp_path / "run", objective=WithMetric.name, steps=2))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert rows and all(r["eval_twice"] == pytest.approx(2 * r["eval_loss"], rel=1e-5) for r in rows)
    assert all(r["eval_vocab"] == 261 for r in rows)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_redraws_on_a_terminal_and_writes_few_lines_elsewhere():
    term = FakeTerminal()
    bar = ProgressBar(10, initial=2, stream=term)
    bar.update(3, loss="1.0")
    bar.message("eval")
    bar.update(10, loss="0.5")
    bar.close()
    text = term.getvalue()
    # tqdm's live bar: drawn at once, redrawn in place after "\r"; the message on a cleared line of its own.
    assert text.startswith("\rstep 2/10  20%|")
    assert re.search(r"\r +\reval\n\rstep 3/10  30%\|[^\n]*, loss=1\.0\]", text)
    assert re.search(r"\rstep 10/10 100%\|##########\| \[[^\n]*, loss=0\.5\]\n$", text)
    assert text.count("\n") == 2  # the message's and the one that closes the bar

    log = io.StringIO()
    bar = ProgressBar(100, stream=log, log_interval=3600)
    for step in range(1, 101):
        bar.update(step, loss="1.0")
        if step == 50:
            bar.message("eval")
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and lines[1] == "eval", lines
    assert lines[0].startswith("step 1/100   1%|") and lines[0].endswith(", loss=1.0]")
    assert lines[2].startswith("step 100/100 100%|##########| [") and lines[2].endswith(", loss=1.0]")
    assert "\r" not in log.getvalue()


def test_without_matplotlib_the_plot_is_skipped_with_a_note(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import raises ImportError
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=1, eval_every=1))
    notes = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "note"]
    assert len(notes) == 1 and "matplotlib is not installed" in notes[0]["note"]
    assert not (out / "loss.png").exists()


def test_a_protein_model_keeps_its_tokenizer(tmp_path):
    """Trained on FASTA with the amino-acid tokenizer, the exported model decodes with that tokenizer."""
    from lnlm_ssm.data.tokenizers import AminoAcidTokenizer, load_tokenizer

    rng = random.Random(0)
    fasta = tmp_path / "proteins.fasta"
    fasta.write_text("".join(f">p{i}\n" + "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(120)) + "\n"
                             for i in range(40)))
    out = tmp_path / "run"
    train(TrainConfig(preset="mamba-tiny", model={**TINY_MODEL, "vocab_size": 31}, data=str(fasta), tokenizer="amino",
                      out=str(out), steps=2, batch_size=2, seq_len=16, eval_every=2, eval_batches=1, ckpt_every=100,
                      log_every=1, backend="cpu"))
    tokenizer = load_tokenizer(out / "model")
    assert isinstance(tokenizer, AminoAcidTokenizer)
    assert MambaLM.from_pretrained(out / "model").config.vocab_size == tokenizer.vocab_size


def test_evaluation_time_does_not_count_as_training_time(corpus, tmp_path, monkeypatch):
    """tokens_per_s is training throughput: a slow evaluation must not drag down the next logged rate."""
    import time

    from lnlm_ssm.training import loop

    evaluate = loop._Run._evaluate

    pause = 3.0

    def slow_evaluate(self, model, sampler):
        time.sleep(pause)
        return evaluate(self, model, sampler)

    monkeypatch.setattr(loop._Run, "_evaluate", slow_evaluate)
    out = tmp_path / "run"
    train(tiny(corpus, out, steps=6, eval_every=3, log_every=1))
    rates = {row["step"]: row["tokens_per_s"] for row in read_metrics(out / "metrics.jsonl") if row["kind"] == "train"}
    # Counted, the 3 s evaluation would hold step 4's rate under tokens_per_step / 3 s; a step takes
    # milliseconds here, and the bound leaves room for a loaded machine (up to 0.6 s for the step).
    tokens_per_step = 4 * 32
    assert rates[4] > 5 * tokens_per_step / pause, rates
