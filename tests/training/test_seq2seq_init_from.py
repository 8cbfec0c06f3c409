"""Text-to-text fine-tuning from a checkpoint: ``lnlm-ssm train --objective seq2seq --init-from DIR``."""

import json
import shutil

import pytest
import torch

import lnlm_ssm
from lnlm_ssm.cli import main
from lnlm_ssm.data.text_pairs import encode_pair
from lnlm_ssm.data.tokenizers import TOKENIZER_KIND_FILE
from lnlm_ssm.models import MambaLM, Seq2SeqLM, preset
from lnlm_ssm.objectives import Seq2SeqObjective, SpanCorruptionObjective
from lnlm_ssm.training import TrainConfig, TrainConfigError, train
from lnlm_ssm.training.metrics import read_metrics
from lnlm_ssm.training.state import checkpoint_path

TINY = ["d_model=32", "num_heads=2", "head_dim=16", "d_ff=64", "n_encoder_layer=2", "n_decoder_layer=2"]
RUN = ["--batch-size", "2", "--seq-len", "24", "--eval-batches", "1", "--backend", "cpu"]


def write_pairs(path, numbers):
    path.write_text("".join(json.dumps({"input": f"add {i} and {i}", "target": str(2 * i)}) + "\n" for i in numbers))
    return path


@pytest.fixture(scope="module")
def span_model(tmp_path_factory):
    """The model/ of a two-step span-corruption run of t5-tiny."""
    root = tmp_path_factory.mktemp("span")
    (root / "doc.md").write_text("".join(f"line {j}: the quick brown fox.\n" for j in range(80)))
    model = [arg for field in TINY for arg in ("--model", field)]
    argv = ["train", "--objective", "span", "--preset", "t5-tiny", *model, "--data", str(root / "doc.md"),
            "--out", str(root / "run"), *RUN, "--steps", "2", "--eval-every", "2"]
    assert main(argv) == 0
    return root / "run" / "model"


def first_weights(monkeypatch) -> list:
    """Records the weights the seq2seq objective sees at its first call (step 1, before any update)."""
    seen = []
    call = Seq2SeqObjective.__call__

    def spy(self, model, batch):
        if not seen:
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return call(self, model, batch)

    monkeypatch.setattr(Seq2SeqObjective, "__call__", spy)
    return seen


def test_fine_tuning_starts_from_the_span_checkpoint(span_model, tmp_path, monkeypatch, capsys):
    data, held_out = write_pairs(tmp_path / "train.jsonl", range(12)), write_pairs(tmp_path / "eval.jsonl", range(4))
    seen = first_weights(monkeypatch)
    out = tmp_path / "ft"
    argv = ["train", "--objective", "seq2seq", "--init-from", str(span_model), "--data", str(data),
            "--eval-data", str(held_out), "--out", str(out), *RUN, "--steps", "3", "--eval-every", "3"]
    assert main(argv) == 0
    span = lnlm_ssm.from_pretrained(span_model)
    assert seen and seen[0].keys() == span.state_dict().keys()
    assert all(torch.equal(seen[0][k], v) for k, v in span.state_dict().items())
    tuned = lnlm_ssm.from_pretrained(out / "model")
    assert isinstance(tuned, Seq2SeqLM) and tuned.config == span.config
    assert not torch.equal(tuned.embedding.weight, span.embedding.weight)  # it trained
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) == 1 and 0 <= evals[0]["eval_accuracy"] <= 1
    # The init directory's tokenizer goes with the model, which generates from the CLI.
    assert (out / "model" / TOKENIZER_KIND_FILE).read_bytes() == (span_model / TOKENIZER_KIND_FILE).read_bytes()
    # ... and the model card names that one, not --tokenizer's default.
    card = (out / "model" / "README.md").read_text()
    assert f"`{span_model.resolve()}`'s (--init-from)" in card
    capsys.readouterr()
    assert main(["generate", "--model", str(out / "model"), "--prompt", "add 1 and 1", "--max-new-tokens", "3"]) == 0


def test_a_resumed_fine_tuning_run_equals_an_uninterrupted_one(span_model, tmp_path):
    data = write_pairs(tmp_path / "train.jsonl", range(12))

    def config(out, **fields):
        return TrainConfig(objective="seq2seq", init_from=str(span_model), data=str(data), out=str(out),
                           batch_size=2, seq_len=24, eval_batches=1, eval_every=4, ckpt_every=2, steps=4,
                           backend="cpu", **fields)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(config(whole))
    shutil.copytree(whole, resumed)
    checkpoint_path(resumed / "checkpoints", 4).unlink()
    shutil.rmtree(resumed / "model")
    train(config(resumed, resume=True))
    a, b = (lnlm_ssm.from_pretrained(run / "model").state_dict() for run in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_a_t5_of_hf(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    fields = dict(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0)
    transformers.T5ForConditionalGeneration(transformers.T5Config(**fields, eos_token_id=1)).save_pretrained(
        tmp_path / "t5-eos1"
    )
    data = write_pairs(tmp_path / "train.jsonl", range(12))

    def config(init, out):
        return TrainConfig(objective="seq2seq", init_from=str(tmp_path / init), data=str(data), out=str(tmp_path / out),
                           batch_size=2, seq_len=24, eval_batches=1, eval_every=2, steps=2, backend="cpu")

    # T5's eos is 1; rows tokenised by the byte tokenizer would end with 256, which the model never stops at.
    with pytest.raises(TrainConfigError, match="the tokenizer's eos token is 256 and the model of --init-from ends "
                                               "its output with eos_token_id 1"):
        train(config("t5-eos1", "run1"))
    transformers.T5ForConditionalGeneration(transformers.T5Config(**fields, eos_token_id=256)).save_pretrained(
        tmp_path / "t5"
    )
    seen = first_weights(monkeypatch)
    result = train(config("t5", "run"))
    start = lnlm_ssm.from_pretrained(tmp_path / "t5").state_dict()
    assert all(torch.equal(seen[0][k], v) for k, v in start.items())
    assert result["step"] == 2 and "eval_loss" in result


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(objective="span", init_from="x", data="d.jsonl"), "init_from are for the fine-tuning objectives and "
                                                                 "seq2seq, not 'span'"),
        (dict(objective="clm", eval_data="e.jsonl"), "eval_data are for the fine-tuning objectives and seq2seq"),
        (dict(objective="seq2seq", init_from="x", data="d.jsonl", ref_model="r"), "ref_model is for dpo, not 'seq2seq'"),
    ],
)
def test_config_errors(fields, match):
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig(**fields)


def test_init_from_errors(span_model, tmp_path, capsys):
    data = write_pairs(tmp_path / "train.jsonl", range(12))
    base = ["train", "--objective", "seq2seq", "--data", str(data), *RUN, "--steps", "1"]
    assert main([*base, "--init-from", str(span_model), "--out", str(tmp_path / "a"), "--model", "d_ff=32"]) == 2
    assert "--model sets fields of a new head (pooling, ...) in fine-tuning; the objective 'seq2seq' puts none" in (
        capsys.readouterr().err
    )
    causal = tmp_path / "causal"
    MambaLM(preset("mamba-tiny", n_layer=1, d_model=32)).save_pretrained(causal)
    assert main([*base, "--init-from", str(causal), "--out", str(tmp_path / "b")]) == 2
    assert f"--init-from {causal}: '{causal}' holds a MambaLM, not a Seq2SeqLM" in capsys.readouterr().err


class NoEos:
    vocab_size, eos_token_id, pad_token_id = 10, None, 0

    def encode(self, text):
        return [1, 2]


def test_text_to_text_rows_need_an_eos(tmp_path):
    # T5 ends each input and target with EOS: a tokenizer without one cannot make its rows.
    for objective in (Seq2SeqObjective(), SpanCorruptionObjective()):
        with pytest.raises(ValueError, match=f"the {objective.name} objective needs a tokenizer with an? eos token"):
            objective.use_tokenizer(NoEos())
    with pytest.raises(ValueError, match="text-to-text data needs a tokenizer with an eos token"):
        encode_pair(NoEos(), "a", "b", 8, "here")
