"""The classify objective fine-tunes a head on an encoder, at the fine-tuning default lr, from [CLS] text [SEP]."""

import random
from pathlib import Path

import pytest
import torch

from lnlm_ssm.data.finetune import Encoder, collate
from lnlm_ssm.data.tokenizers import ByteTokenizer
from lnlm_ssm.models import ClassifierConfig, EncoderConfig, SequenceClassifier
from lnlm_ssm.objectives import ClassifyObjective, FinetuneObjective

TOK = ByteTokenizer()


def rows(n, seed):
    """Label: whether the text holds a digit; its place varies, so the [CLS] state must gather the row."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = [rng.choice("abcdefgh") for _ in range(10)]
        label = rng.random() < 0.5
        if label:
            text[rng.randrange(10)] = rng.choice("0123456789")
        out.append({"text": "".join(text), "label": "digit" if label else "none"})
    return out


@pytest.mark.slow  # 80 steps: ~5 s on a quiet 2-core machine, up to 30 on a loaded one
def test_an_encoder_head_learns_from_cls():
    encoder = Encoder(TOK, "classify", 16, {"digit": 0, "none": 1}, frame=True)
    batches = [
        collate([encoder.encode(r, Path("rows.jsonl"), i) for i, r in enumerate(rows(16, seed))], "classify")
        for seed in range(40)
    ]
    held_out = collate([encoder.encode(r, Path("eval.jsonl"), i) for i, r in enumerate(rows(64, 99))], "classify")
    assert held_out["input_ids"][0, 0] == TOK.cls_token_id and held_out["input_ids"][0, -1] == TOK.sep_token_id
    torch.manual_seed(0)
    backbone = EncoderConfig(
        vocab_size=TOK.vocab_size, pad_token_id=TOK.pad_token_id, d_model=32, n_layer=2, num_heads=2,
        d_intermediate=64, max_position_embeddings=32, hidden_dropout=0.0,
    )
    model = SequenceClassifier(ClassifierConfig(backbone=backbone.to_dict(), backbone_architecture="Encoder",
                                                num_labels=2, problem_type="single_label_classification"))
    objective = ClassifyObjective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=FinetuneObjective.default_lr)
    for _ in range(2):  # the held-out accuracy leaves chance after ~60 steps
        for batch in batches:
            loss = objective(model, batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = objective(model.eval(), held_out).metrics["accuracy"].item()
    assert accuracy >= 0.8, accuracy  # chance: 0.5
