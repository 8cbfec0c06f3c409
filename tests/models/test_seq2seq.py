"""Seq2SeqLM on its own: decoding with caches equals the full forward, for attention and Mamba decoders;
padding, loss, presets, save/load, config and input errors; T5's position buckets."""

import pytest
import torch

import lnlm_ssm
from lnlm_ssm.layers.position_bias import relative_position_bucket
from lnlm_ssm.models import ConfigError, Seq2SeqConfig, Seq2SeqLM, preset
from lnlm_ssm.models.seq2seq import SEQ2SEQ_PRESETS, shift_right
from lnlm_ssm.utils.testing import assert_close

VOCAB = 50


def small(decoder_pattern="A", **overrides):
    torch.manual_seed(0)
    fields = dict(
        vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8, d_ff=48, n_encoder_layer=2, n_decoder_layer=2,
        decoder_pattern=decoder_pattern, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        mixer_cfg={"1": {"d_state": 8}, "2": {"d_state": 8, "headdim": 16, "chunk_size": 8}},
    )
    return Seq2SeqLM(Seq2SeqConfig(**{**fields, **overrides})).eval()


_g = torch.Generator().manual_seed(2)
SOURCE = torch.randint(2, VOCAB, (2, 11), generator=_g)
SOURCE_MASK = torch.ones_like(SOURCE)
SOURCE_MASK[1, 7:] = 0
TARGET = torch.randint(2, VOCAB, (2, 9), generator=_g)


@pytest.mark.parametrize("pattern", ["A", "1", "2", "1A"])
def test_cached_decoding_equals_the_full_forward(pattern):
    model = small(pattern)
    with torch.no_grad():
        full = model(SOURCE, SOURCE_MASK, decoder_input_ids=TARGET).logits
        cache = model.allocate_cache(model.encode(SOURCE, SOURCE_MASK), TARGET.shape[1], attention_mask=SOURCE_MASK)
        # A chunk first (the chunked path from an empty cache), then single steps.
        steps = [model.decode_step(TARGET[:, :4], cache)]
        steps += [model.decode_step(TARGET[:, t : t + 1], cache) for t in range(4, TARGET.shape[1])]
    assert cache.seqlen == TARGET.shape[1]
    assert_close(torch.cat(steps, dim=1), full)


@pytest.mark.parametrize("pattern", ["A", "2"])
def test_right_padding_of_the_source_changes_nothing(pattern):
    model = small(pattern)
    with torch.no_grad():
        padded = model(SOURCE, SOURCE_MASK, decoder_input_ids=TARGET).logits[1]
        alone = model(SOURCE[1:, :7], decoder_input_ids=TARGET[1:]).logits[0]
    assert_close(padded, alone)


def test_greedy_generation_of_a_mamba_decoder_is_the_argmax_of_its_forward():
    model = small("2")
    generated = model.generate(SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=8, eos_token_id=None)
    assert generated.shape == (2, 9) and (generated[:, 0] == model.config.decoder_start_token_id).all()
    with torch.no_grad():
        logits = model(SOURCE, SOURCE_MASK, decoder_input_ids=generated[:, :-1]).logits
    assert torch.equal(logits.argmax(-1), generated[:, 1:])


def test_labels_are_shifted_right_and_ignored_where_minus_100():
    model = small()
    labels = TARGET.clone()
    labels[0, 6:] = -100
    assert shift_right(labels, 0, 0).tolist()[0] == [0] + labels[0, :6].tolist() + [0, 0]
    with torch.no_grad():
        out = model(SOURCE, SOURCE_MASK, labels=labels)
        explicit = model(SOURCE, SOURCE_MASK, decoder_input_ids=shift_right(labels, 0, 0)).logits
    assert_close(out.logits, explicit)
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(explicit[keep], labels[keep])
    assert_close(out.loss, expected)


def test_tied_head_reads_the_scaled_decoder_output():
    tied, untied = small(), small(tie_embeddings=False, scale_decoder_output=True)
    untied.load_state_dict({**tied.state_dict(), "lm_head.weight": tied.embedding.weight.detach().clone()})
    assert tied.lm_head.weight is tied.embedding.weight and tied.config.scale_decoder_output
    with torch.no_grad():
        assert_close(untied(SOURCE, decoder_input_ids=TARGET).logits, tied(SOURCE, decoder_input_ids=TARGET).logits)
        untied.config.scale_decoder_output = False
        assert_close(
            untied(SOURCE, decoder_input_ids=TARGET).logits, tied(SOURCE, decoder_input_ids=TARGET).logits * 32**0.5
        )


@pytest.mark.parametrize("name", ["t5-tiny", "mamba-t5-tiny", "hydra-mamba2-t5-tiny", "hybrid-t5-tiny"])
def test_tiny_presets(name, tmp_path):
    model = Seq2SeqLM.from_name(name).eval()
    params = sum(p.numel() for p in model.parameters())
    assert 0.8e6 < params < 1.3e6, params
    assert model.config.vocab_size == 361 and model.config.decoder_start_token_id == model.config.pad_token_id
    text = torch.tensor([list(b"hello world")])
    generated = model.generate(text, max_new_tokens=4, eos_token_id=None)
    assert generated.shape == (1, 5)
    model.save_pretrained(tmp_path)
    again = lnlm_ssm.from_pretrained(tmp_path).eval()
    assert isinstance(again, Seq2SeqLM) and again.config == model.config
    assert torch.equal(again.generate(text, max_new_tokens=4, eos_token_id=None), generated)


def test_quantised_model_generates_and_reloads(tmp_path):
    model = Seq2SeqLM.from_name("mamba-t5-tiny").eval()
    text = torch.tensor([list(b"quantised")])
    with torch.no_grad():
        reference = model(text, decoder_input_ids=text[:, :4]).logits
        lnlm_ssm.quantize_(model, "int8")
        quantised = model(text, decoder_input_ids=text[:, :4]).logits
    assert ((quantised - reference).abs().max() / reference.abs().max()).item() < 0.05
    model.save_pretrained(tmp_path)
    again = lnlm_ssm.from_pretrained(tmp_path)
    assert again.quantization == "int8"
    with torch.no_grad():
        assert torch.equal(again(text, decoder_input_ids=text[:, :4]).logits, quantised)


def test_presets_are_registered():
    assert set(SEQ2SEQ_PRESETS) == {"t5-small", "t5-tiny", "mamba-t5-tiny", "hydra-mamba2-t5-tiny", "hybrid-t5-tiny"}
    assert preset("mamba-t5-tiny").decoder_layers() == "11"
    assert preset("t5-small", n_decoder_layer=3) == Seq2SeqConfig(n_decoder_layer=3)
    assert Seq2SeqConfig().to_dict() == Seq2SeqConfig.from_dict(Seq2SeqConfig().to_dict()).to_dict()


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"decoder_pattern": "AB"}, r"decoder_pattern 'AB' has characters \['B'\]"),
        ({"encoder_pattern": "1"}, r"encoder_pattern '1' has characters \['1'\]"),
        ({"n_decoder_layer": 3, "decoder_pattern": "A1"}, "must repeat a whole number of times in 3 layers"),
        ({"ffn_activation": "tanh"}, "ffn_activation must be one of"),
        ({"eos_token_id": 50}, "eos_token_id must be < vocab_size=50"),
        ({"scale_decoder_output": 1}, "scale_decoder_output must be a bool"),
        (
            {"decoder_pattern": "1", "mixer_cfg": {"1": {"headdim": 8}}},
            r"Mamba of layer 0 does not take mixer_cfg\['1'\]",
        ),
    ],
)
def test_config_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        small(**fields)


def test_unknown_config_field():
    with pytest.raises(ConfigError, match=r"unknown Seq2SeqConfig fields \['n_layer'\]"):
        Seq2SeqConfig.from_dict({"n_layer": 2})


def test_input_errors():
    model = small()
    with pytest.raises(ValueError, match="give input_ids"):
        model(decoder_input_ids=TARGET)
    with pytest.raises(ValueError, match="give decoder_input_ids or labels"):
        model(SOURCE)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, vocab_size=50\) or be -100"):
        model(SOURCE, labels=TARGET - 10)
    with pytest.raises(ValueError, match=r"labels must have decoder_input_ids' shape \(2, 9\)"):
        model(SOURCE, decoder_input_ids=TARGET, labels=TARGET[:, :5])
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of shape \(batch, seqlen\) = \(2, 11\)"):
        model(SOURCE, SOURCE_MASK[:, :5], decoder_input_ids=TARGET)
    with pytest.raises(ValueError, match="the encoder input has batch 1 but decoder_input_ids batch 2"):
        model(SOURCE[:1], decoder_input_ids=TARGET)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=50\)"):
        model(SOURCE + VOCAB, decoder_input_ids=TARGET)
    cache = model.allocate_cache(model.encode(SOURCE), 2)
    with pytest.raises(ValueError, match="cannot take 3 more"):
        model.decode_step(TARGET[:, :3], cache)


def test_relative_position_buckets():
    """T5's buckets by hand (bidirectional: 16 per side, 8 exact; one-sided: 32, 16 exact; max distance 128)."""
    distance = torch.tensor([0, -1, -7, -8, -127, -128, -1000, 1, 7, 200])
    both = relative_position_bucket(distance, bidirectional=True, num_buckets=32, max_distance=128)
    # -8: 8 + floor(log(8/8) / log(16) * 8) = 8; -127: 8 + floor(log(127/8) / log(16) * 8) = 15; the rest clamp at 15.
    assert both.tolist() == [0, 1, 7, 8, 15, 15, 15, 17, 23, 31]
    one = relative_position_bucket(distance, bidirectional=False, num_buckets=32, max_distance=128)
    # Later keys share bucket 0; -20 would be 16 + floor(log(20/16) / log(8) * 16) = 17.
    assert one.tolist() == [0, 1, 7, 8, 31, 31, 31, 0, 0, 0]
    twenty = relative_position_bucket(torch.tensor([-20]), bidirectional=False, num_buckets=32, max_distance=128)
    assert twenty.item() == 17


@pytest.mark.parametrize("name", ["hydra-mamba2-t5-tiny", "hybrid-t5-tiny"])
def test_ssm_encoders_ignore_right_padding(name):
    torch.manual_seed(0)
    model = Seq2SeqLM.from_name(name).eval()
    source = torch.tensor([list(b"hello world"), list(b"hi there!!!")])
    mask = torch.ones_like(source)
    mask[1, 8:] = 0
    target = torch.tensor([[257, 104, 105], [257, 104, 105]])
    padded = model(source, attention_mask=mask, decoder_input_ids=target).logits[1]
    alone = model(source[1:, :8], decoder_input_ids=target[1:]).logits[0]
    assert_close(padded, alone)
