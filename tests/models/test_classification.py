"""SequenceClassifier / TokenClassifier: a new head on any MambaLM checkpoint, pooling, problem types, save/load."""

import json
import logging

import pytest
import torch

from lnlm_ssm import SequenceClassifier, TokenClassifier
from lnlm_ssm.models import CheckpointError, ClassifierConfig, ConfigError, MambaLM, MambaLMConfig
from lnlm_ssm.models.classification import pool

ATTN = {"num_heads": 2, "head_dim": 16, "rotary_emb_dim": 16}


def tiny_lm(**fields):
    torch.manual_seed(0)
    return MambaLM(MambaLMConfig(d_model=32, n_layer=2, vocab_size=257, **fields)).eval()


@pytest.mark.parametrize("fields", [{}, {"layer_pattern": "2A", "ssm_cfg": {"layer": "Mamba2", "headdim": 16},
                                         "attn_cfg": ATTN}])
def test_new_head_on_a_pretrained_backbone(tmp_path, caplog, fields):
    lm = tiny_lm(**fields)
    lm.save_pretrained(tmp_path / "lm")
    id2label = {0: "neg", 1: "neutral", 2: "pos"}
    with caplog.at_level(logging.WARNING, logger="lnlm_ssm.models.classification"):
        clf = SequenceClassifier.from_pretrained(tmp_path / "lm", num_labels=3, id2label=id2label)
    assert sum("new head" in r.getMessage() for r in caplog.records) == 1
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        # The backbone is the LM's: its LM head on the classifier's hidden states gives the LM's logits.
        torch.testing.assert_close(lm.lm_head(clf.eval().hidden_states(ids, None))[..., :257], lm(ids).logits)
        logits = clf(ids).logits
    assert logits.shape == (2, 3)
    assert clf.config.id2label == {"0": "neg", "1": "neutral", "2": "pos"}
    assert clf.config.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    clf.save_pretrained(tmp_path / "clf")
    stored = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert stored["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"} and stored["architecture"] == "SequenceClassifier"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lnlm_ssm.models.classification"):
        again = SequenceClassifier.from_pretrained(tmp_path / "clf")
    assert not caplog.records  # a classifier checkpoint has its head
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids).logits, logits)
    with pytest.raises(CheckpointError, match="num_labels"):
        SequenceClassifier.from_pretrained(tmp_path / "clf", num_labels=5)
    with pytest.raises(CheckpointError, match="not a TokenClassifier"):
        TokenClassifier.from_pretrained(tmp_path / "clf")


def test_head_from_a_transformers_mamba_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=257, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4,
    )).eval()
    hf.save_pretrained(tmp_path / "hf")
    clf = TokenClassifier.from_pretrained(tmp_path / "hf", num_labels=4).eval()
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        expected = hf(ids).logits
        ours = clf.hidden_states(ids, None) @ hf.lm_head.weight.T
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    assert clf(ids).logits.shape == (2, 7, 4)


@pytest.mark.parametrize("pooling", ["mean", "last", "first"])
def test_pooling_ignores_padding(pooling):
    lm = tiny_lm()
    config = ClassifierConfig(backbone=lm.config.to_dict(), num_labels=2, pooling=pooling)
    torch.manual_seed(1)
    clf = SequenceClassifier(config).eval()
    rows = [torch.randint(0, 256, (n,)) for n in (5, 8, 3)]
    ids = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    with torch.no_grad():
        batched = clf(ids, attention_mask=mask).logits
        single = torch.cat([clf(row[None]).logits for row in rows])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_pool_positions():
    hidden = torch.arange(12.0).reshape(1, 4, 3).repeat(2, 1, 1)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "last"), hidden[[0, 1], [2, 3]])
    torch.testing.assert_close(pool(hidden, mask, "first"), hidden[[0, 1], [0, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.stack([hidden[0, :3].mean(0), hidden[1, 1:].mean(0)]))


def test_problem_type_is_inferred_as_hf_does():
    backbone = tiny_lm().config.to_dict()
    ids = torch.randint(0, 256, (4, 6))
    cases = [
        (1, torch.randn(4), "regression"),
        (3, torch.tensor([0, 2, 1, 0]), "single_label_classification"),
        (3, torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]]), "multi_label_classification"),
    ]
    for num_labels, labels, problem in cases:
        clf = SequenceClassifier(ClassifierConfig(backbone=backbone, num_labels=num_labels))
        loss = clf(ids, labels=labels).loss
        assert clf.config.problem_type == problem and loss.ndim == 0 and torch.isfinite(loss)


def test_token_classifier_ignores_padding_and_minus_100():
    config = ClassifierConfig(backbone=tiny_lm().config.to_dict(), num_labels=3)
    clf = TokenClassifier(config)
    ids = torch.randint(0, 256, (2, 5))
    labels = torch.tensor([[0, 1, 2, -100, 1], [2, 2, 0, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    out = clf(ids, attention_mask=mask, labels=labels)
    keep = (labels != -100) & mask.bool()
    expected = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected)


def test_bad_head_config():
    backbone = tiny_lm().config.to_dict()
    with pytest.raises(ConfigError, match="pooling"):
        ClassifierConfig(backbone=backbone, pooling="max")
    with pytest.raises(ConfigError, match="id2label"):
        ClassifierConfig(backbone=backbone, num_labels=2, id2label={"0": "a", "2": "b"})
