"""HF transformers T5 checkpoints (v1.0, v1.1, mT5) load into Seq2SeqLM and give HF's logits and greedy tokens."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

import lnlm_ssm  # noqa: E402
from lnlm_ssm.checkpoint import CheckpointError  # noqa: E402
from lnlm_ssm.models import Seq2SeqLM  # noqa: E402


VOCAB = 100
# 8 buckets up to distance 20: sequences of 30 reach the logarithmic buckets and the last one.
SMALL = dict(
    vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=20, decoder_start_token_id=0,
)


def assert_close(actual, expected, rel=1e-4):
    """Relative error max|actual - expected| / max|expected| <= rel: fp32 rounding, which T5's unscaled
    residual stream amplifies, moves logits near zero by more than an element-wise rtol allows."""
    assert actual.shape == expected.shape
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= rel, f"relative error {error:.2e} > {rel:.0e}"


def randomized(model):
    """HF's init is too regular (a misplaced weight could pass): add noise."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def hf_t5_v10():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(feed_forward_proj="relu", **SMALL))


def hf_t5_v11(**overrides):
    """v1.1 as released: gated-gelu and an untied head (transformers >= 5 ties it at construction: untie it by hand)."""
    config = transformers.T5Config(**{**SMALL, "feed_forward_proj": "gated-gelu", **overrides})
    model = transformers.T5ForConditionalGeneration(config)
    # At the scale of the tied head's scaled logits, where fp32 rounding stays within assert_close.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 32**-0.5)
    model.config.tie_word_embeddings = False
    model.config.scale_decoder_outputs = False
    return model


def hf_mt5():
    fields = dict(SMALL, feed_forward_proj="gated-gelu")
    return transformers.MT5ForConditionalGeneration(transformers.MT5Config(**fields))


BUILDERS = {"t5-v1.0": hf_t5_v10, "t5-v1.1": hf_t5_v11}

_g = torch.Generator().manual_seed(1)
SOURCE = torch.randint(2, VOCAB, (2, 30), generator=_g)
# The second row is padded on the right, as T5 pads.
SOURCE_MASK = torch.ones_like(SOURCE)
SOURCE_MASK[1, 19:] = 0
TARGET = torch.randint(2, VOCAB, (2, 25), generator=_g)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def hf_model(request, tmp_path_factory):
    torch.manual_seed(0)
    model = randomized(BUILDERS[request.param]())
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return model, directory


def test_logits_and_loss_match(hf_model):
    hf, directory = hf_model
    ours = lnlm_ssm.from_pretrained(directory).eval()
    assert isinstance(ours, Seq2SeqLM)
    assert ours.config.tie_embeddings == (hf.lm_head.weight is hf.shared.weight)
    labels = TARGET.clone()
    labels[0, 20:] = -100
    with torch.no_grad():
        expected = hf(input_ids=SOURCE, attention_mask=SOURCE_MASK, labels=labels)
        actual = ours(SOURCE, SOURCE_MASK, labels=labels)
    assert actual.logits.shape == expected.logits.shape == (2, 25, VOCAB)
    assert_close(actual.logits, expected.logits)
    assert_close(actual.loss, expected.loss)


def test_mt5_logits_match(tmp_path):
    hf = randomized(hf_mt5())
    hf.save_pretrained(tmp_path)
    ours = lnlm_ssm.from_pretrained(tmp_path).eval()
    assert not ours.config.scale_decoder_output
    with torch.no_grad():
        expected = hf(input_ids=SOURCE, attention_mask=SOURCE_MASK, decoder_input_ids=TARGET).logits
        assert_close(ours(SOURCE, SOURCE_MASK, decoder_input_ids=TARGET).logits, expected)


def test_decoder_deeper_than_encoder(tmp_path):
    # transformers' generate fails on such a model (its cache has the encoder's depth): logits only.
    hf = randomized(hf_t5_v11(num_decoder_layers=3))
    hf.save_pretrained(tmp_path)
    ours = lnlm_ssm.from_pretrained(tmp_path).eval()
    assert (ours.config.n_encoder_layer, ours.config.n_decoder_layer) == (2, 3)
    with torch.no_grad():
        expected = hf(input_ids=SOURCE, attention_mask=SOURCE_MASK, decoder_input_ids=TARGET).logits
        assert_close(ours(SOURCE, SOURCE_MASK, decoder_input_ids=TARGET).logits, expected)


def test_decoder_attention_mask_and_explicit_decoder_inputs(hf_model):
    hf, directory = hf_model
    ours = lnlm_ssm.from_pretrained(directory).eval()
    decoder_mask = torch.ones_like(TARGET)
    decoder_mask[1, 15:] = 0
    with torch.no_grad():
        expected = hf(
            input_ids=SOURCE, attention_mask=SOURCE_MASK, decoder_input_ids=TARGET, decoder_attention_mask=decoder_mask
        ).logits
        actual = ours(SOURCE, SOURCE_MASK, decoder_input_ids=TARGET, decoder_attention_mask=decoder_mask).logits
    assert_close(actual, expected)


def hf_greedy(hf, eos_token_id):
    with torch.no_grad():
        return hf.generate(
            SOURCE, attention_mask=SOURCE_MASK, do_sample=False, max_new_tokens=10, eos_token_id=eos_token_id
        )


def test_greedy_generation_matches(hf_model):
    hf, directory = hf_model
    ours = lnlm_ssm.from_pretrained(directory).eval()
    expected = hf_greedy(hf, None)
    assert expected.shape == (2, 11)
    assert len(set(expected[1].tolist())) > 2, "a degenerate model repeating one token proves little"
    actual = ours.generate(SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(actual, expected)


def test_greedy_generation_pads_after_eos(tmp_path):
    hf = randomized(hf_t5_v10())
    hf.save_pretrained(tmp_path)
    ours = lnlm_ssm.from_pretrained(tmp_path).eval()
    free = ours.generate(SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=10, eos_token_id=None)
    # An eos that the first row emits and the second never: the first is padded after it.
    eos = next(t for t in free[0, 1:].tolist() if t not in free[1].tolist())
    end = free[0].tolist().index(eos) + 1
    expected = hf_greedy(hf, eos)
    assert expected.shape == (2, 11) and end < 11
    assert (expected[0, end:] == hf.config.pad_token_id).all()
    assert torch.equal(ours.generate(SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=10, eos_token_id=eos), expected)


def test_beam_search_matches(tmp_path):
    torch.manual_seed(0)
    hf = randomized(hf_t5_v11())
    hf.save_pretrained(tmp_path)
    ours = lnlm_ssm.from_pretrained(tmp_path).eval()
    greedy = ours.generate(SOURCE, attention_mask=SOURCE_MASK, max_new_tokens=8, eos_token_id=None)
    # Found by trying: the first row's best beam ends with this eos, the second's differs from greedy.
    eos = 33
    with torch.no_grad():
        expected = hf.generate(
            SOURCE, attention_mask=SOURCE_MASK, do_sample=False, num_beams=4, max_new_tokens=8, eos_token_id=eos
        )
    actual = ours.generate(SOURCE, attention_mask=SOURCE_MASK, num_beams=4, max_new_tokens=8, eos_token_id=eos)
    # transformers fills a beam output after its eos with `pad_token_id or eos`: eos for T5's pad 0. We pad.
    ended = (expected == eos).long().cumsum(1) > 0
    after = ended & (ended.long().cumsum(1) > 1)
    assert after[0].any() and not torch.equal(expected[1], greedy[1]), "the case is no longer the one chosen"
    assert torch.equal(actual, expected.masked_fill(after, hf.config.pad_token_id))


def test_resaved_in_our_format_loads_the_same(hf_model, tmp_path):
    _, directory = hf_model
    ours = lnlm_ssm.from_pretrained(directory)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == "Seq2SeqLM"
    again = Seq2SeqLM.from_pretrained(tmp_path)
    assert again.config == ours.config
    for key, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], t), key


def test_transformers_4_layout_with_embedding_copies(tmp_path):
    """transformers < 5 stored encoder/decoder.embed_tokens beside shared, and scaled exactly when tied."""
    hf = randomized(hf_t5_v10())
    hf.config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["scale_decoder_outputs"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["encoder.embed_tokens.weight"] = state["decoder.embed_tokens.weight"] = state["shared.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = lnlm_ssm.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = hf(input_ids=SOURCE, decoder_input_ids=TARGET).logits
        assert_close(ours(SOURCE, decoder_input_ids=TARGET).logits, expected)
    state["decoder.embed_tokens.weight"] = state["shared.weight"] + 1
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="decoder.embed_tokens.weight differs from shared.weight"):
        lnlm_ssm.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5-errors")
    hf_t5_v10().save_pretrained(directory)
    return directory


def edited(directory, tmp_path, state_edit=None, **changes):
    from safetensors.torch import load_file, save_file

    target = tmp_path / "edited"
    target.mkdir()
    for path in directory.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    if state_edit is not None:
        state = load_file(target / "model.safetensors")
        state_edit(state)
        save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"is_encoder_decoder": False}, "is_encoder_decoder False"),
        ({"feed_forward_proj": "gated-swiglu"}, "feed_forward_proj 'gated-swiglu'"),
        ({"feed_forward_proj": "relu-gated"}, "feed_forward_proj 'relu-gated'"),
        ({"eos_token_id": [1, 2]}, r"eos_token_id \[1, 2\]"),
        # A decoder depth the weights do not have: the missing blocks are named.
        ({"num_decoder_layers": 3}, r"missing keys \['decoder.layers.2"),
        ({"num_decoder_layers": -1}, "n_decoder_layer must be a positive integer"),
    ],
)
def test_unsupported_configs_are_named(t5_dir, tmp_path, changes, match):
    with pytest.raises(CheckpointError, match=match):
        lnlm_ssm.from_pretrained(edited(t5_dir, tmp_path, **changes))


def test_position_bias_per_layer_is_refused(t5_dir, tmp_path):
    def add_bias(state):
        state["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)

    with pytest.raises(CheckpointError, match="relative_attention_bias in encoder block 1"):
        lnlm_ssm.from_pretrained(edited(t5_dir, tmp_path, state_edit=add_bias))


def test_missing_projection_is_named(t5_dir, tmp_path):
    def drop(state):
        del state["decoder.block.1.layer.1.EncDecAttention.v.weight"]

    with pytest.raises(CheckpointError, match=r"lacks \['decoder.block.1.\*.EncDecAttention.v.weight'\]"):
        lnlm_ssm.from_pretrained(edited(t5_dir, tmp_path, state_edit=drop))


def test_unused_cross_attention_bias_of_old_checkpoints_is_ignored(t5_dir, tmp_path):
    def add(state):
        state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)

    assert isinstance(lnlm_ssm.from_pretrained(edited(t5_dir, tmp_path, state_edit=add)), Seq2SeqLM)
