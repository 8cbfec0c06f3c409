"""Task heads on encoders: HF BERT/RoBERTa/ALBERT/ELECTRA classifiers read with HF's logits, and new heads on our
encoders."""

import json
import logging

import pytest
import torch

import lnlm_ssm
from lnlm_ssm import SequenceClassifier, TokenClassifier
from lnlm_ssm.models import ClassifierConfig, Encoder, EncoderConfig, MaskedLM

VOCAB = 100
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=40,
)
LABELS = {0: "neg", 1: "neutral", 2: "pos"}
# name -> (HF class, HF config class, config fields beyond COMMON, our class)
CASES = {
    "bert-seq": ("BertForSequenceClassification", "BertConfig", {}, SequenceClassifier),
    "bert-seq-multi": (
        "BertForSequenceClassification", "BertConfig", dict(problem_type="multi_label_classification"),
        SequenceClassifier,
    ),
    "roberta-seq": ("RobertaForSequenceClassification", "RobertaConfig", dict(type_vocab_size=1), SequenceClassifier),
    "bert-token": ("BertForTokenClassification", "BertConfig", {}, TokenClassifier),
    "roberta-token": ("RobertaForTokenClassification", "RobertaConfig", {}, TokenClassifier),
    # factorised embeddings, and 2 groups of 2 layers shared by 4 (embedding_size 16 < hidden_size 32)
    "albert-seq": (
        "AlbertForSequenceClassification", "AlbertConfig",
        dict(embedding_size=16, num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2), SequenceClassifier,
    ),
    "albert-token": ("AlbertForTokenClassification", "AlbertConfig", dict(embedding_size=16), TokenClassifier),
    # its sequence head's activation is GELU; embeddings narrower than the layers (embeddings_project)
    "electra-seq": ("ElectraForSequenceClassification", "ElectraConfig", dict(embedding_size=16), SequenceClassifier),
    "electra-token": ("ElectraForTokenClassification", "ElectraConfig", {}, TokenClassifier),
}


def build_hf(name):
    transformers = pytest.importorskip("transformers")
    cls, config_cls, fields, _ = CASES[name]
    label2id = {v: k for k, v in LABELS.items()}
    config = getattr(transformers, config_cls)(**{**COMMON, **fields}, id2label=LABELS, label2id=label2id)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config)
    # HF's init (small weights, zero biases) would let a misplaced weight pass: add noise.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def padded_batch(pad_id):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 14), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, 9:], mask[1, 9:] = pad_id, 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_classifiers_give_hf_logits(name, tmp_path):
    hf = build_hf(name)
    hf.save_pretrained(tmp_path / "hf")
    ours = lnlm_ssm.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(ours) is CASES[name][3]
    assert ours.config.id2label == {"0": "neg", "1": "neutral", "2": "pos"}
    assert ours.config.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    assert ours.config.problem_type == hf.config.problem_type
    ids, mask = padded_batch(hf.config.pad_token_id)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        actual = ours(ids, attention_mask=mask).logits
    real = mask.bool() if actual.ndim == 3 else slice(None)
    err = ((actual[real] - expected[real]).abs().max() / expected[real].abs().max()).item()
    assert err <= 1e-4, err
    ours.save_pretrained(tmp_path / "ours")
    stored = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert stored["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    again = type(ours).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, attention_mask=mask).logits, actual, rtol=0, atol=0)


def test_hf_sequence_classifier_loss_is_hfs(tmp_path):
    hf = build_hf("bert-seq")
    hf.save_pretrained(tmp_path / "hf")
    ours = SequenceClassifier.from_pretrained(tmp_path / "hf").eval()
    ids, mask = padded_batch(0)
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        actual = ours(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
    assert ours.config.problem_type == hf.config.problem_type == "single_label_classification"


def test_a_new_head_on_an_hf_bert_mlm_says_so_once(tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.BertForMaskedLM(transformers.BertConfig(**COMMON)).save_pretrained(tmp_path / "mlm")
    with caplog.at_level(logging.WARNING, logger="lnlm_ssm.models.classification"):
        clf = SequenceClassifier.from_pretrained(tmp_path / "mlm", num_labels=3, id2label=LABELS)
    messages = [r.getMessage() for r in caplog.records if "new head" in r.getMessage()]
    assert len(messages) == 1 and "pooler.dense, score" in messages[0] and "MaskedLM" in messages[0]
    assert (clf.config.backbone_architecture, clf.config.pooling, clf.config.pooler) == ("Encoder", "first", True)
    mlm = MaskedLM.from_pretrained(tmp_path / "mlm").eval()
    ids, mask = padded_batch(0)
    with torch.no_grad():
        torch.testing.assert_close(clf.eval().hidden_states(ids, mask), mlm(ids, mask).hidden_states)


def test_a_bare_bert_brings_its_pooler(tmp_path, caplog):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**COMMON)).eval()
    hf.save_pretrained(tmp_path / "bare")
    with caplog.at_level(logging.WARNING, logger="lnlm_ssm.models.classification"):
        clf = SequenceClassifier.from_pretrained(tmp_path / "bare", num_labels=2).eval()
    assert any("a new head (score; 2 labels)" in r.getMessage() for r in caplog.records)
    ids, mask = padded_batch(0)
    with torch.no_grad():
        pooled = hf(input_ids=ids, attention_mask=mask).pooler_output
        torch.testing.assert_close(clf(ids, attention_mask=mask).logits, clf.score(pooled), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pattern", ["A", "B", "H"])
@pytest.mark.parametrize("head", [SequenceClassifier, TokenClassifier])
def test_new_heads_on_our_encoders(pattern, head, tmp_path):
    ssd = {"d_state": 8, "headdim": 16, "chunk_size": 8}
    mixer_cfg = {"B": {"inner": "Mamba2", **ssd}, "H": ssd}
    torch.manual_seed(0)
    config = EncoderConfig(
        vocab_size=VOCAB, d_model=32, n_layer=2, num_heads=2, d_intermediate=64, max_position_embeddings=32,
        layer_pattern=pattern, prenorm=pattern != "A", mixer_cfg={k: v for k, v in mixer_cfg.items() if k == pattern},
    )
    MaskedLM(config).save_pretrained(tmp_path / "mlm")
    clf = head.from_pretrained(tmp_path / "mlm", num_labels=3).eval()
    assert clf.framed and clf.config.pooling == "first"
    ids, mask = padded_batch(config.pad_token_id)
    with torch.no_grad():
        logits = clf(ids, attention_mask=mask).logits
        alone = clf(ids[1:, :9], attention_mask=mask[1:, :9]).logits
    assert logits.shape == ((2, 3) if head is SequenceClassifier else (2, 14, 3))
    # A padded row's outputs are the row's alone: the padding is masked in every mixer.
    torch.testing.assert_close(logits[1, :9] if logits.ndim == 3 else logits[1], alone[0], rtol=1e-4, atol=1e-5)
    labels = torch.tensor([0, 2]) if head is SequenceClassifier else torch.randint(0, 3, ids.shape)
    clf.train()(ids, attention_mask=mask, labels=labels).loss.backward()
    assert clf.score.weight.grad is not None and clf.backbone.embeddings.token.weight.grad is not None
    clf.save_pretrained(tmp_path / "clf")
    again = lnlm_ssm.from_pretrained(tmp_path / "clf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids, attention_mask=mask).logits, clf.eval()(ids, attention_mask=mask).logits)


def test_encoder_head_defaults_and_choices():
    encoder = EncoderConfig(vocab_size=VOCAB, d_model=32, n_layer=1, num_heads=2, d_intermediate=64).to_dict()
    config = ClassifierConfig(backbone=encoder, backbone_architecture="Encoder")
    assert (config.pooling, config.pooler) == ("first", True)
    config = ClassifierConfig(backbone=encoder, backbone_architecture="Encoder", pooling="mean", pooler=False)
    clf = SequenceClassifier(config)
    assert clf.pooler is None and (config.pooling, config.pooler) == ("mean", False)
    assert isinstance(clf.backbone, Encoder) and clf.backbone.pooler is None


@pytest.mark.parametrize("hf_class, config_class, fields", [
    ("AlbertForMaskedLM", "AlbertConfig", dict(embedding_size=16)),
    ("ElectraForPreTraining", "ElectraConfig", dict(embedding_size=16)),
])
def test_new_heads_on_albert_and_electra(hf_class, config_class, fields, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    getattr(transformers, hf_class)(getattr(transformers, config_class)(**COMMON, **fields)).save_pretrained(tmp_path)
    pretrained = lnlm_ssm.from_pretrained(tmp_path).eval()
    clf = TokenClassifier.from_pretrained(tmp_path, num_labels=2).eval()
    ids, mask = padded_batch(0)
    with torch.no_grad():
        torch.testing.assert_close(clf.hidden_states(ids, mask), pretrained.encoder(ids, mask).last_hidden_state)


def test_pooler_act_is_checked():
    with pytest.raises(ValueError, match="pooler_act must be one of \\('tanh', 'gelu'\\); got 'relu'"):
        ClassifierConfig(backbone=dict(vocab_size=VOCAB, d_model=32, n_layer=2), backbone_architecture="Encoder",
                         pooler_act="relu")
