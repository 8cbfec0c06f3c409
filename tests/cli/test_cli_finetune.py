"""``lnlm-ssm train --objective classify|token-classify|sft|reward|dpo --init-from`` and ``lnlm-ssm predict``."""

import json

import pytest
import torch

from lnlm_ssm.cli import main
from lnlm_ssm.data.tokenizers import save_tokenizer_kind
from lnlm_ssm.models import MambaLM, MambaLMConfig, SequenceClassifier, TokenClassifier
from lnlm_ssm.training.metrics import read_metrics


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("base") / "lm"
    MambaLM(MambaLMConfig(d_model=32, n_layer=2, vocab_size=257, ssm_cfg={"d_state": 8})).save_pretrained(directory)
    save_tokenizer_kind(directory, "byte")
    return directory


def flags(base, data, out, objective, *extra):
    return ["train", "--objective", objective, "--init-from", str(base), "--data", str(data), "--out", str(out),
            "--batch-size", "4", "--seq-len", "24", "--lr", "3e-3", "--warmup-steps", "1", "--backend", "cpu",
            *extra]


CLASSIFY = [{"text": f"{w} number {i}", "label": w} for i in range(8) for w in ("spam", "ham")]


def test_classify_train_resume_and_predict(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", CLASSIFY)
    held_out = write_jsonl(tmp_path / "eval.jsonl", CLASSIFY[:4])
    common = ["--eval-data", str(held_out), "--eval-every", "2", "--ckpt-every", "2"]
    straight = tmp_path / "straight"
    assert main(flags(base, data, straight, "classify", "--steps", "4", *common)) == 0
    assert "held-out loss" in (out := capsys.readouterr().out) and "accuracy" in out
    rows = read_metrics(straight / "metrics.jsonl")
    assert all("accuracy" in r for r in rows if r["kind"] == "train")
    assert all("eval_accuracy" in r for r in rows if r["kind"] == "eval")
    # Resume: two steps, then two more from the checkpoint, give the uninterrupted run's weights.
    resumed = tmp_path / "resumed"
    assert main(flags(base, data, resumed, "classify", "--steps", "2", *common)) == 0
    assert main(flags(base, data, resumed, "classify", "--steps", "4", "--resume", *common)) == 0
    a = SequenceClassifier.from_pretrained(straight / "model").state_dict()
    b = SequenceClassifier.from_pretrained(resumed / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = SequenceClassifier.from_pretrained(straight / "model")
    assert model.config.label2id == {"ham": 0, "spam": 1}
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"text": "spam number 3"}, {"text": "ham"}])
    assert main(["predict", "--model", str(straight / "model"), "--data", str(inputs),
                 "--out", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 2 and all(r["label"] in ("ham", "spam") and 0.5 <= r["score"] <= 1 for r in out)


def test_token_classify_and_predict(base, tmp_path):
    rows = [{"tokens": ["x", " = ", "1"], "labels": ["NAME", "OP", "NUMBER"]}] * 4
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(flags(base, data, tmp_path / "run", "token-classify", "--steps", "2")) == 0
    model = TokenClassifier.from_pretrained(tmp_path / "run" / "model")
    assert model.config.label2id == {"NAME": 0, "NUMBER": 1, "OP": 2}
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"tokens": ["y", "+", "22"]}])
    assert main(["predict", "--model", str(tmp_path / "run" / "model"), "--data", str(inputs),
                 "--out", str(tmp_path / "out.jsonl")]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(row["labels"]) == 3 and len(row["scores"]) == 3


PAIRS = [{"prompt": f"q{i}:", "chosen": " yes", "rejected": " no"} for i in range(8)]


@pytest.mark.parametrize("objective", ["sft", "reward", "dpo"])
def test_sft_reward_dpo_runs(base, tmp_path, objective):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in PAIRS] if objective == "sft" else PAIRS
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(flags(base, data, tmp_path / "run", objective, "--steps", "2", "--eval-data", str(data))) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    if objective == "dpo":
        train = [r for r in records if r["kind"] == "train"]
        assert {"reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin"} <= train[0].keys()
        assert "eval_reward_accuracy" in [r for r in records if r["kind"] == "eval"][-1]


def test_bad_rows_name_the_file_line_and_field(base, tmp_path, capsys):
    cases = [
        ("classify", [{"text": "a", "label": "x"}, {"text": "b"}], "line 2: the row has no field 'label'"),
        ("classify", [{"text": 3, "label": "x"}], "line 1: field 'text' must be a str"),
        ("sft", [{"prompt": "p", "completion": ""}], "line 1: field 'completion' must not be empty"),
        ("dpo", [{"prompt": "p", "completion": "c"}], "line 1: the row has no field 'chosen'"),
    ]
    for objective, rows, message in cases:
        data = write_jsonl(tmp_path / "bad.jsonl", rows)
        assert main(flags(base, data, tmp_path / objective, objective, "--steps", "1")) == 2
        err = capsys.readouterr().err
        assert "bad.jsonl" in err and message in err, err
    data = write_jsonl(tmp_path / "train.jsonl", CLASSIFY)
    unseen = write_jsonl(tmp_path / "eval.jsonl", [{"text": "a", "label": "eggs"}])
    assert main(flags(base, data, tmp_path / "unseen", "classify", "--steps", "1", "--eval-data", str(unseen))) == 2
    assert "eval.jsonl, line 1: field 'label' holds the label 'eggs'" in capsys.readouterr().err
    assert main(["train", "--objective", "classify", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "--init-from" in capsys.readouterr().err
    assert main(flags(base, data, tmp_path / "pool", "classify", "--model", "pooling=max")) == 2
    assert "pooling must be one of" in capsys.readouterr().err
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}])
    assert main(flags(base, sft, tmp_path / "sft", "sft", "--model", "pooling=mean")) == 2
    assert "puts none on" in capsys.readouterr().err
    assert main(flags(base, data, tmp_path / "fsdp", "dpo", "--distributed", "fsdp")) == 2
    assert "--no-dpo-shared-prefix" in capsys.readouterr().err
