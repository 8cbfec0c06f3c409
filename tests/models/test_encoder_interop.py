"""HF BERT, RoBERTa, ALBERT and ELECTRA checkpoints load through lnlm_ssm.from_pretrained and give HF's outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

import lnlm_ssm  # noqa: E402
from lnlm_ssm.checkpoint import CheckpointError  # noqa: E402
from lnlm_ssm.models import Encoder, MaskedLM, ReplacedTokenDetector, SentenceOrderMaskedLM  # noqa: E402

VOCAB = 100
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=40, hidden_dropout_prob=0.1,
)
# name -> (HF class, HF config class, config fields beyond COMMON, our class it loads as)
CASES = {
    "bert-mlm": ("BertForMaskedLM", "BertConfig", {}, MaskedLM),
    "bert-bare": ("BertModel", "BertConfig", {}, Encoder),
    # RoBERTa's pad id 1 and positions from 2; two token types to exercise them.
    "roberta-mlm": ("RobertaForMaskedLM", "RobertaConfig", dict(type_vocab_size=2, hidden_act="gelu_new"), MaskedLM),
    "roberta-bare": ("RobertaModel", "RobertaConfig", dict(type_vocab_size=1), Encoder),
    # 4 layers over 2 groups of 2 shared layers: blocks 0 1 0 1 2 3 2 3.
    "albert-mlm": (
        "AlbertForMaskedLM", "AlbertConfig",
        dict(embedding_size=16, num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2), MaskedLM,
    ),
    "albert-pretraining": ("AlbertForPreTraining", "AlbertConfig", dict(embedding_size=16), SentenceOrderMaskedLM),
    "albert-bare": ("AlbertModel", "AlbertConfig", dict(embedding_size=32), Encoder),
    "electra-generator": ("ElectraForMaskedLM", "ElectraConfig", dict(embedding_size=16), MaskedLM),
    "electra-discriminator": ("ElectraForPreTraining", "ElectraConfig", dict(embedding_size=32), ReplacedTokenDetector),
    "electra-bare": ("ElectraModel", "ElectraConfig", dict(embedding_size=24), Encoder),
}


def randomized(model):
    """HF's init (small weights, zero biases, unit norms) would let a misplaced weight pass: add noise."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def build_hf(name, **overrides):
    cls, config_cls, fields, _ = CASES[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **fields, **overrides})
    torch.manual_seed(0)
    return randomized(getattr(transformers, cls)(config))


def batch(config):
    """Two rows, the second right-padded after 9 tokens, with two segments each (when there are two types)."""
    pad_id = config.pad_token_id
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 14), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, 9:], mask[1, 9:] = pad_id, 0
    token_types = torch.zeros_like(ids)
    token_types[0, 6:], token_types[1, 5:9] = 1, 1
    return ids, mask, token_types.clamp(max=config.type_vocab_size - 1)


def outputs(out):
    """The tensors to compare: logits (MLM, discriminator), or hidden states (bare), and the SOP logits."""
    main = getattr(out, "logits", None)
    if main is None:
        main = getattr(out, "prediction_logits", None)
    if main is None:
        main = out.last_hidden_state
    return main, getattr(out, "sop_logits", None)


def rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    hf = build_hf(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return request.param, hf, directory


def test_outputs_match_hf_with_token_types_and_padding(checkpoint):
    name, hf, directory = checkpoint
    ours = lnlm_ssm.from_pretrained(directory).eval()
    assert type(ours) is CASES[name][3]
    ids, mask, token_types = batch(hf.config)
    with torch.no_grad():
        expected, expected_sop = outputs(hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types))
        actual, actual_sop = outputs(ours(ids, attention_mask=mask, token_type_ids=token_types))
    assert actual.shape == expected.shape
    real = mask.bool()  # padded positions are not compared: neither model defines them
    assert rel_err(actual[real], expected[real]) <= 1e-4
    if expected_sop is not None:
        assert rel_err(actual_sop, expected_sop) <= 1e-4
    if name == "bert-bare":
        assert rel_err(ours(ids, attention_mask=mask, token_type_ids=token_types).pooled,
                       hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types).pooler_output) <= 1e-4


def test_a_padded_row_equals_the_row_alone(checkpoint):
    _, hf, directory = checkpoint
    ours = lnlm_ssm.from_pretrained(directory).eval()
    ids, mask, token_types = batch(hf.config)
    with torch.no_grad():
        padded, _ = outputs(ours(ids, attention_mask=mask, token_type_ids=token_types))
        alone, _ = outputs(ours(ids[1:, :9], token_type_ids=token_types[1:, :9]))
    assert rel_err(padded[1, :9], alone[0]) <= 1e-5


def test_resaved_in_our_format_loads_the_same(checkpoint, tmp_path):
    _, _, directory = checkpoint
    ours = lnlm_ssm.from_pretrained(directory)
    ours.save_pretrained(tmp_path)
    again = lnlm_ssm.from_pretrained(tmp_path)
    assert type(again) is type(ours) and again.config == ours.config
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == ours.architecture
    for key, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], t), key
    if isinstance(again, MaskedLM) and again.config.tie_embeddings:
        assert again.mlm_head.decoder.weight is again.encoder.embeddings.token.weight


def test_the_model_class_must_match_the_checkpoint(tmp_path):
    build_hf("bert-bare").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds a Encoder, not a MaskedLM"):
        MaskedLM.from_pretrained(tmp_path)
    assert type(Encoder.from_pretrained(tmp_path)) is Encoder


def test_an_untied_decoder_loads(tmp_path):
    hf = build_hf("bert-mlm", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    ours = lnlm_ssm.from_pretrained(tmp_path).eval()
    assert ours.mlm_head.decoder.weight is not ours.encoder.embeddings.token.weight
    ids, mask, token_types = batch(hf.config)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
        actual = ours(ids, attention_mask=mask, token_type_ids=token_types).logits
    assert rel_err(actual[mask.bool()], expected[mask.bool()]) <= 1e-4


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("bert-mlm", "position_embedding_type", "relative_key"),
        ("roberta-mlm", "is_decoder", True),
        ("electra-discriminator", "add_cross_attention", True),
        ("albert-mlm", "hidden_act", "mish"),
    ],
)
def test_unsupported_variants_name_the_field(tmp_path, name, field, value):
    build_hf(name).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=field):
        lnlm_ssm.from_pretrained(tmp_path)


def test_an_unread_architecture_is_named(tmp_path):
    build_hf("bert-mlm").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["BertForNextSentencePrediction"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"BertForNextSentencePrediction.*'BertForMaskedLM'"):
        lnlm_ssm.from_pretrained(tmp_path)


def test_bert_base_uncased_style_weights(tmp_path):
    """bert-base-uncased lists BertForMaskedLM but holds BertForPreTraining's weights (pooler, NSP head), with
    TensorFlow's LayerNorm names: HF's BertForMaskedLM ignores the extra heads, and so do we."""
    config = transformers.BertConfig(**COMMON)
    torch.manual_seed(0)
    hf = randomized(transformers.BertForPreTraining(config))
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "architectures": ["BertForMaskedLM"]}))
    state = load_file(tmp_path / "model.safetensors")
    assert any(key.startswith("cls.seq_relationship.") for key in state)
    renamed = {key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
               for key, t in state.items()}
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = lnlm_ssm.from_pretrained(tmp_path).eval()
    assert type(ours) is MaskedLM
    ids, mask, token_types = batch(config)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=token_types).prediction_logits
        actual = ours(ids, attention_mask=mask, token_type_ids=token_types).logits
    assert rel_err(actual[mask.bool()], expected[mask.bool()]) <= 1e-4
