"""The encoder models: presets, configs, losses, ALBERT's sharing, ELECTRA's pair, and saving and loading them."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lnlm_ssm
from lnlm_ssm.models import (
    ConfigError,
    ElectraConfig,
    ElectraPretraining,
    Encoder,
    EncoderConfig,
    MambaLMConfig,
    MaskedLM,
    ReplacedTokenDetector,
    SentenceOrderMaskedLM,
    preset,
)

SMALL = dict(vocab_size=50, d_model=32, n_layer=2, num_heads=4, d_intermediate=64, max_position_embeddings=16,
             hidden_dropout=0.0)


def ids_and_mask():
    ids = torch.randint(1, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("name", ["bert-tiny", "roberta-tiny", "albert-tiny", "electra-tiny"])
def test_tiny_presets_have_about_a_million_parameters(name):
    config = preset(name)
    model = ElectraPretraining(config) if isinstance(config, ElectraConfig) else MaskedLM(config)
    assert 0.8e6 <= sum(p.numel() for p in model.parameters()) <= 1.2e6
    encoder = config.discriminator if isinstance(config, ElectraConfig) else config
    assert encoder.vocab_size == 261  # the byte tokenizer's 257 ids and 4 special tokens


def test_bert_110m_preset_and_the_causal_presets():
    model = MaskedLM(preset("bert-110m"), device="meta")
    assert 105e6 <= sum(p.numel() for p in model.parameters()) <= 115e6
    assert isinstance(preset("mamba-tiny"), MambaLMConfig)
    assert preset("bert-tiny", n_layer=2).n_layer == 2


def test_masked_lm_loss_is_the_cross_entropy_of_the_labelled_positions():
    torch.manual_seed(0)
    model = MaskedLM(EncoderConfig(**SMALL)).eval()
    ids, mask = ids_and_mask()
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5] = 7, 9
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 10, 50)
    expected = (F.cross_entropy(out.logits[0, 2], torch.tensor(7)) + F.cross_entropy(out.logits[1, 5], torch.tensor(9))) / 2
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.encoder.embeddings.token.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"labels must have shape \(batch, seqlen\) = \(2, 10\)"):
        model(ids, labels=labels[:, :5])


def test_replaced_token_loss_ignores_padding_and_unlabelled_positions():
    torch.manual_seed(0)
    model = ReplacedTokenDetector(EncoderConfig(**SMALL)).eval()
    ids, mask = ids_and_mask()
    labels = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(1))
    labels[0, 0] = -100
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 10)
    keep = mask.bool() & (labels != -100)
    expected = F.binary_cross_entropy_with_logits(out.logits[keep], labels[keep].float())
    torch.testing.assert_close(out.loss, expected)


def test_sentence_order_loss_adds_to_the_mlm_loss():
    torch.manual_seed(0)
    config = EncoderConfig(**{**SMALL, "embedding_size": 16, "num_hidden_groups": 1})
    model = SentenceOrderMaskedLM(config).eval()
    ids, mask = ids_and_mask()
    labels = torch.full_like(ids, -100)
    labels[:, 3] = 4
    order = torch.tensor([0, 1])
    out = model(ids, attention_mask=mask, labels=labels, sentence_order_label=order)
    assert out.sop_logits.shape == (2, 2)
    mlm = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, mlm.loss + F.cross_entropy(out.sop_logits, order))
    sop_only = model(ids, attention_mask=mask, sentence_order_label=order).loss
    torch.testing.assert_close(sop_only, F.cross_entropy(out.sop_logits, order))


def test_albert_sharing_runs_groups_of_blocks():
    config = EncoderConfig(**{**SMALL, "n_layer": 4, "num_hidden_groups": 2, "inner_group_num": 2})
    assert config.block_order() == [0, 1, 0, 1, 2, 3, 2, 3]
    one = Encoder(EncoderConfig(**{**SMALL, "n_layer": 6, "num_hidden_groups": 1}))
    assert len(one.layers) == 1
    assert sum(p.numel() for p in one.parameters()) == sum(
        p.numel() for p in Encoder(EncoderConfig(**{**SMALL, "n_layer": 1})).parameters()
    )
    with pytest.raises(ConfigError, match=r"num_hidden_groups \(4\) must divide n_layer \(6\)"):
        EncoderConfig(**{**SMALL, "n_layer": 6, "num_hidden_groups": 4})


def test_config_errors():
    with pytest.raises(ConfigError, match="has the character 'Q', which names no encoder mixer"):
        Encoder(EncoderConfig(**{**SMALL, "layer_pattern": "AQ"}))
    with pytest.raises(ConfigError, match="hidden_act must be one of"):
        EncoderConfig(hidden_act="tanhh")
    with pytest.raises(ConfigError, match=r"unknown EncoderConfig fields \['hidden_size'\]"):
        EncoderConfig.from_dict({"hidden_size": 3})
    with pytest.raises(ConfigError, match="the generator shares the discriminator's embeddings"):
        ElectraConfig(EncoderConfig(**SMALL), dataclasses.replace(EncoderConfig(**SMALL), vocab_size=51))
    with pytest.raises(ConfigError, match="does not take the mixer_cfg given"):
        Encoder(EncoderConfig(**{**SMALL, "mixer_cfg": {"A": {"heads": 2}}}))


def test_roberta_positions_count_real_tokens_from_the_offset():
    model = Encoder(EncoderConfig(**{**SMALL, "pad_token_id": 1, "position_offset": 2}))
    ids = torch.tensor([[5, 6, 7, 1, 1], [1, 5, 6, 1, 8]])
    assert model.default_position_ids(ids).tolist() == [[2, 3, 4, 1, 1], [1, 2, 3, 1, 4]]
    bert = Encoder(EncoderConfig(**SMALL))
    assert bert.default_position_ids(ids).tolist() == [[0, 1, 2, 3, 4]] * 2


def test_a_prenorm_encoder_ignores_padding():
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(**{**SMALL, "prenorm": True})).eval()
    assert model.norm_f is not None
    ids, mask = ids_and_mask()
    padded = model(ids, attention_mask=mask).last_hidden_state
    alone = model(ids[1:, :7]).last_hidden_state
    torch.testing.assert_close(padded[1, :7], alone[0])


def test_electra_pair_shares_embeddings_and_saves_them_once(tmp_path):
    torch.manual_seed(0)
    pair = ElectraPretraining(ElectraConfig(EncoderConfig(**{**SMALL, "d_model": 64, "d_intermediate": 128})))
    gen, disc = pair.generator, pair.discriminator
    assert gen.config.d_model == 16 and gen.config.num_heads == 1 and gen.config.d_intermediate == 32
    assert gen.encoder.embeddings is disc.encoder.embeddings
    assert gen.mlm_head.decoder.weight is disc.encoder.embeddings.token.weight
    ids, mask = ids_and_mask()
    assert gen(ids, attention_mask=mask).logits.shape == (2, 10, 50)
    assert disc(ids, attention_mask=mask).logits.shape == (2, 10)

    pair.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert not any(key.startswith("generator.encoder.embeddings.") for key in stored)
    loaded = lnlm_ssm.from_pretrained(tmp_path)
    assert type(loaded) is ElectraPretraining and loaded.config == pair.config
    assert loaded.generator.encoder.embeddings is loaded.discriminator.encoder.embeddings
    assert loaded.generator.mlm_head.decoder.weight is loaded.discriminator.encoder.embeddings.token.weight
    for key, t in pair.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t), key


@pytest.mark.parametrize("cls", [Encoder, MaskedLM, SentenceOrderMaskedLM, ReplacedTokenDetector])
def test_save_and_load_round_trip(tmp_path, cls):
    torch.manual_seed(0)
    model = cls(EncoderConfig(**{**SMALL, "embedding_size": 16, "add_pooler": True})).eval()
    model.save_pretrained(tmp_path)
    loaded = lnlm_ssm.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls and loaded.config == model.config
    assert type(cls.from_pretrained(tmp_path)) is cls
    ids, mask = ids_and_mask()
    before, after = model(ids, attention_mask=mask), loaded(ids, attention_mask=mask)
    key = "last_hidden_state" if cls is Encoder else "logits"
    assert torch.equal(getattr(before, key), getattr(after, key))


def test_exported_from_the_package():
    for name in ("Encoder", "EncoderConfig", "MaskedLM", "SentenceOrderMaskedLM", "ReplacedTokenDetector",
                 "ElectraPretraining", "ElectraConfig"):
        assert getattr(lnlm_ssm, name) is getattr(lnlm_ssm.models, name)


def test_a_new_mixer_is_one_table_entry(monkeypatch):
    from lnlm_ssm.models import encoder

    seen = {}

    class Scale(torch.nn.Module):
        def __init__(self, d_model, scale=1.0, layer_idx=None, device=None, dtype=None, backend="auto"):
            super().__init__()
            self.scale, self.layer_idx = scale, layer_idx

        def forward(self, hidden_states, cache=None, *, mask=None, position_ids=None):
            seen[self.layer_idx] = mask
            return hidden_states * self.scale

    monkeypatch.setitem(encoder.ENCODER_MIXERS, "S", Scale)
    model = Encoder(EncoderConfig(**{**SMALL, "layer_pattern": "AS", "mixer_cfg": {"S": {"scale": 2.0}}})).eval()
    assert type(model.layers[0].mixer).__name__ == "Attention" and model.layers[1].mixer.scale == 2.0
    ids, mask = ids_and_mask()
    model(ids, attention_mask=mask)
    assert torch.equal(seen[1], mask.bool())
