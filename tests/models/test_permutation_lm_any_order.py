"""AnyOrderLM: a MambaLM read in any order (σ-GPT double positions), its any-order generation and infilling."""

import pytest
import torch

import lnlm_ssm
from lnlm_ssm.data.tokenizers import ByteTokenizer
from lnlm_ssm.models import AnyOrderLM, MambaLM, preset, preset_architecture
from lnlm_ssm.utils.testing import assert_close

SEQ = 10


def tiny(name="mamba-plm-tiny", **overrides):
    torch.manual_seed(0)
    fields = dict(d_model=32, n_layer=2, vocab_size=50, max_positions=32)
    if name == "hybrid-plm-tiny":
        fields.update(attn_cfg={"num_heads": 2, "head_dim": 16, "rotary_emb_dim": 16}, layer_pattern="MA",
                      ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8})
    return AnyOrderLM(preset(name, **{**fields, **overrides})).eval()


def ids(batch=2):
    return torch.randint(0, 50, (batch, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["mamba-plm-tiny", "hybrid-plm-tiny"])
def test_identity_order_without_positions_is_the_causal_lm(name):
    model = tiny(name)
    causal = MambaLM(model.config.backbone_config()).eval()
    causal.load_state_dict(model.lm.state_dict())
    with torch.no_grad():
        model.position_in.weight.zero_()
        model.position_target.weight.zero_()
        x = ids()
        assert_close(model(x, labels=x).logits, causal(x).logits)
        torch.testing.assert_close(model(x, labels=x).loss, causal(x, labels=x).loss)


def test_a_permuted_order_reads_the_permuted_sequence_with_its_positions():
    model = tiny()
    x = ids()
    order = torch.randperm(SEQ, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(x, order).logits
        next_positions = torch.cat([order[1:], torch.tensor([-1])]).expand(2, SEQ)
        expected = model.ordered_logits(x[:, order], order.expand(2, SEQ), next_positions)
        # the loss is the cross entropy of each step against the token at the next position of the order
        loss = torch.nn.functional.cross_entropy(got[:, :-1].flatten(0, 1), x[:, order[1:]].flatten())
        torch.testing.assert_close(model(x, order, labels=x).loss, loss)
    assert_close(got, expected)
    assert not torch.allclose(got, model(x).logits)


def test_save_load_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    loaded = lnlm_ssm.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, AnyOrderLM) and loaded.config == model.config
    order = torch.arange(SEQ).flip(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids(), order).logits, model(ids(), order).logits, rtol=0, atol=0)
    with pytest.raises(lnlm_ssm.models.CheckpointError, match="holds a AnyOrderLM"):
        MambaLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["mamba-plm-tiny", "hybrid-plm-tiny"])
def test_generation_fills_the_order_and_keeps_the_known_tokens(name):
    model = tiny(name)
    x = ids()
    order = torch.tensor([6, 3, 4, 5])
    out = model.generate(x, order, temperature=0)
    keep = torch.ones(SEQ, dtype=torch.bool)
    keep[order] = False
    assert out.shape == x.shape and torch.equal(out[:, keep], x[:, keep])
    assert torch.equal(model.generate(x, order, temperature=0), out)
    # greedy any-order decoding is the argmax of the full forward pass in that order, step by step
    known = torch.nonzero(keep).flatten()
    full = torch.cat([known, order])
    with torch.no_grad():
        logits = model(out, full).logits
    predicted = logits[:, len(known) - 1 : -1].argmax(-1)
    assert torch.equal(predicted, out[:, order])


def test_infill_keeps_prefix_and_suffix():
    model = tiny()
    prefix, suffix = ids()[:, :3], ids()[:, 7:]
    middle = model.infill(prefix, suffix, 4, temperature=0)
    assert middle.shape == (2, 4)
    canvas = torch.cat([prefix, middle, suffix], dim=1)
    assert torch.equal(model.generate(canvas, torch.arange(3, 7), temperature=0)[:, 3:7], middle)
    sampled = model.infill(prefix, suffix, 4, generator=torch.Generator().manual_seed(0))
    again = model.infill(prefix, suffix, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, again)


def test_bad_orders_and_lengths_are_named():
    model = tiny()
    x = ids()
    with pytest.raises(ValueError, match="order must not repeat a position"):
        model.generate(x, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match=r"order must hold positions in \[0, 10\)"):
        model.generate(x, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="at least one position must be known"):
        model.generate(x, torch.arange(SEQ))
    with pytest.raises(ValueError, match="order must be a permutation of 0..9"):
        model(x, torch.arange(SEQ - 1))
    with pytest.raises(ValueError, match="order must not repeat"):
        model(x, torch.zeros(SEQ, dtype=torch.long))
    with pytest.raises(ValueError, match="max_positions=32"):
        model.infill(x, x, 20)
    with pytest.raises(ValueError, match="length must be an integer >= 1"):
        model.infill(x[:, :2], x[:, :2], 0)


@pytest.mark.parametrize("name", ["xlnet-tiny", "mamba-plm-tiny", "hybrid-plm-tiny"])
def test_tiny_presets_are_about_a_million_parameters_over_the_byte_vocabulary(name):
    config = preset(name)
    model = preset_architecture(name).model_class(config)
    count = sum(p.numel() for p in model.parameters())
    assert config.vocab_size == ByteTokenizer.vocab_size and 0.7e6 < count < 1.4e6, count
