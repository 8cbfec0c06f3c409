"""``lnlm-ssm train --objective span|seq2seq`` on the T5 presets, and ``lnlm-ssm generate`` on a Seq2SeqLM."""

import json

import pytest
import torch

import lnlm_ssm
from lnlm_ssm.cli import main
from lnlm_ssm.data.tokenizers import ByteTokenizer
from lnlm_ssm.models import MaskedLM, Seq2SeqLM, preset
from lnlm_ssm.training.metrics import read_metrics

TINY = ["d_model=32", "num_heads=2", "head_dim=16", "d_ff=64", "n_encoder_layer=2", "n_decoder_layer=2"]


def flags(preset, data, out, objective):
    model = [arg for field in TINY for arg in ("--model", field)]
    return [
        "train", "--objective", objective, "--preset", preset, *model, "--data", str(data), "--out", str(out),
        "--batch-size", "2", "--seq-len", "24", "--eval-batches", "1", "--backend", "cpu", "--steps", "2",
        "--eval-every", "2",
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "doc.md").write_text("".join(f"line {j}: the quick brown fox.\n" for j in range(80)))
    return root


@pytest.mark.parametrize("preset", ["t5-tiny"])
def test_span_training_then_generate(corpus, tmp_path, capsys, preset):
    out = tmp_path / "run"
    assert main(flags(preset, corpus, out, "span")) == 0
    stdout, _ = capsys.readouterr()
    assert "accuracy" in stdout
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert 0 <= evals[-1]["eval_accuracy"] <= 1
    model = lnlm_ssm.from_pretrained(out / "model").eval()
    assert isinstance(model, Seq2SeqLM) and model.config.vocab_size == 261 + 100
    argv = ["generate", "--model", str(out / "model"), "--prompt", "line 3", "--max-new-tokens", "5",
            "--temperature", "0"]
    assert main(argv) == 0
    printed, err = capsys.readouterr()
    # The greedy decoding of the prompt with T5's EOS, up to EOS; sentinels print as <extra_id_N>.
    tok = ByteTokenizer()
    ids = model.generate(torch.tensor([tok.encode("line 3") + [256]]), max_new_tokens=5)[0, 1:].tolist()
    ids = ids[: ids.index(256)] if 256 in ids else ids
    expected = "".join(f"<extra_id_{360 - i}>" if i >= 261 else tok.decode([i]) for i in ids)
    assert err == "" and printed == expected + "\n"


def test_span_needs_room_for_the_sentinels(corpus, tmp_path, capsys):
    assert main([*flags("t5-tiny", corpus, tmp_path / "run", "span"), "--model", "vocab_size=300"]) == 2
    assert "smaller than the tokenizer's 261 plus the 100 extra ids of the objective 'span'" in capsys.readouterr().err


def write_pairs(path, n, bad_line=None):
    rows = [json.dumps({"input": f"add {i} and {i}", "target": str(2 * i)}) for i in range(n)]
    if bad_line is not None:
        rows[bad_line - 1] = json.dumps({"input": "x", "answer": "y"})
    path.write_text("\n".join(rows) + "\n")
    return path


def test_seq2seq_training_on_jsonl_pairs(tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 30)
    out = tmp_path / "run"
    assert main(flags("mamba-t5-tiny", data, out, "seq2seq")) == 0
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals and 0 <= evals[-1]["eval_accuracy"] <= 1
    capsys.readouterr()
    bad = write_pairs(tmp_path / "bad.jsonl", 30, bad_line=7)
    assert main(flags("t5-tiny", bad, tmp_path / "bad_run", "seq2seq")) == 2
    assert "bad.jsonl, line 7: field 'target' must be a non-empty string; got nothing" in capsys.readouterr().err
    assert main(flags("t5-tiny", tmp_path, tmp_path / "dir_run", "seq2seq")) == 2
    assert "a .jsonl file" in capsys.readouterr().err


def test_generate_refuses_a_model_that_does_not_generate(tmp_path, capsys):
    MaskedLM(preset("bert-tiny", n_layer=1)).save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    assert "holds a MaskedLM; generate takes a MambaLM or a Seq2SeqLM" in capsys.readouterr().err
