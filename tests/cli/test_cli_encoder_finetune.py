"""``lnlm-ssm train --objective classify|token-classify`` and ``lnlm-ssm predict`` on encoder checkpoints."""

import json

import pytest
import torch

from lnlm_ssm.cli import main
from lnlm_ssm.data.tokenizers import ByteTokenizer, save_tokenizer_kind
from lnlm_ssm.models import EncoderConfig, MaskedLM, SequenceClassifier, TokenClassifier

TOK = ByteTokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", params=["A", "H"])
def encoder(request, tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("encoder") / "mlm"
    pattern = request.param
    config = EncoderConfig(
        vocab_size=TOK.vocab_size, pad_token_id=TOK.pad_token_id, d_model=32, n_layer=2, num_heads=2,
        d_intermediate=64, max_position_embeddings=32, layer_pattern=pattern, prenorm=pattern != "A",
        mixer_cfg={"H": {"d_state": 8, "headdim": 16, "chunk_size": 8}} if pattern == "H" else {},
    )
    MaskedLM(config).save_pretrained(directory)
    save_tokenizer_kind(directory, "byte")
    return directory


def flags(base, data, out, objective, *extra):
    return ["train", "--objective", objective, "--init-from", str(base), "--data", str(data), "--out", str(out),
            "--batch-size", "4", "--seq-len", "24", "--warmup-steps", "1", "--backend", "cpu", *extra]


def test_classify_an_encoder_and_predict(encoder, tmp_path):
    rows = [{"text": f"{w} number {i}", "label": w} for i in range(8) for w in ("spam", "ham")]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(flags(encoder, data, tmp_path / "run", "classify", "--steps", "3")) == 0
    model = SequenceClassifier.from_pretrained(tmp_path / "run" / "model")
    assert model.config.backbone_architecture == "Encoder" and model.config.pooling == "first" and model.framed
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"text": "spam number 3"}, {"text": "ham"}])
    assert main(["predict", "--model", str(tmp_path / "run" / "model"), "--data", str(inputs),
                 "--out", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 2 and all(r["label"] in ("ham", "spam") and 0.5 <= r["score"] <= 1 for r in out)
    # predict frames the text as training did: its score is the model's on [CLS] text [SEP].
    ids = torch.tensor([[TOK.cls_token_id, *TOK.encode("ham"), TOK.sep_token_id]])
    with torch.no_grad():
        probs = model.eval()(ids).logits.softmax(dim=-1)[0]
    assert out[1]["score"] == pytest.approx(probs.max().item(), rel=1e-5)


def test_token_classify_an_encoder_and_predict(encoder, tmp_path):
    rows = [{"tokens": ["x", " = ", "1"], "labels": ["NAME", "OP", "NUMBER"]}] * 4
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(flags(encoder, data, tmp_path / "run", "token-classify", "--steps", "2")) == 0
    model = TokenClassifier.from_pretrained(tmp_path / "run" / "model")
    assert model.config.backbone_architecture == "Encoder"
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"tokens": ["y", "+", "22"]}])
    assert main(["predict", "--model", str(tmp_path / "run" / "model"), "--data", str(inputs),
                 "--out", str(tmp_path / "out.jsonl")]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    ids = torch.tensor([[TOK.cls_token_id, *TOK.encode("y+22"), TOK.sep_token_id]])
    with torch.no_grad():
        best = model.eval()(ids).logits.softmax(dim=-1)[0].max(dim=-1)
    # The pieces' first tokens, after [CLS]: "y" 1, "+" 2, "22" 3.
    assert row["scores"] == pytest.approx(best.values[[1, 2, 3]].tolist(), rel=1e-5)
    assert row["labels"] == [model.config.id2label[str(i)] for i in best.indices[[1, 2, 3]].tolist()]


def test_an_encoder_cannot_serve_a_causal_objective(encoder, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": " yes", "rejected": " no"}] * 4)
    assert main(flags(encoder, pairs, tmp_path / "dpo", "dpo", "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert "--init-from" in err and "MaskedLM" in err, err
