"""PermutationLM (XLNet): HF XLNetLMHeadModel's logits through our code, two streams, mems, save/load, bad input."""

import pytest
import torch

import lnlm_ssm
from lnlm_ssm.models import CheckpointError, PermutationLM, PermutationLMConfig, preset
from lnlm_ssm.utils.testing import assert_close

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH = 100, 12, 2


def hf_xlnet(tmp_path, **overrides):
    torch.manual_seed(0)
    config = transformers.XLNetConfig(
        vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=64, mem_len=overrides.pop("mem_len", None),
        **overrides,
    )
    hf = transformers.XLNetLMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = lnlm_ssm.from_pretrained(tmp_path / "hf").eval()
    return hf, ours


def inputs(num_predict=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    perm_mask = (torch.rand(BATCH, SEQ, SEQ, generator=g) < 0.4).float()
    target_mapping = torch.zeros(BATCH, num_predict, SEQ)
    for k in range(num_predict):
        target_mapping[:, k, SEQ - num_predict + k] = 1.0
    token_type_ids = (torch.arange(SEQ) >= SEQ // 2).long().expand(BATCH, SEQ).clone()
    return ids, perm_mask, target_mapping, token_type_ids


def test_reads_hf_xlnet_and_matches_its_logits(tmp_path):
    hf, ours = hf_xlnet(tmp_path)
    assert isinstance(ours, PermutationLM)
    ids, perm_mask, target_mapping, token_type_ids = inputs()
    attention_mask = torch.ones(BATCH, SEQ)
    attention_mask[1, :3] = 0
    cases = [
        {},
        {"perm_mask": perm_mask},
        {"perm_mask": perm_mask, "target_mapping": target_mapping},
        {"perm_mask": perm_mask, "target_mapping": target_mapping, "token_type_ids": token_type_ids},
        {"token_type_ids": token_type_ids, "attention_mask": attention_mask},
    ]
    with torch.no_grad():
        for kwargs in cases:
            expected = hf(ids, **kwargs).logits
            got = ours(ids, **kwargs).logits
            assert got.shape == expected.shape
            assert_close(got, expected)
        labels = torch.randint(0, VOCAB, (BATCH, 3))
        expected = hf(ids, perm_mask=perm_mask, target_mapping=target_mapping, labels=labels).loss
        got = ours(ids, perm_mask=perm_mask, target_mapping=target_mapping, labels=labels).loss
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_mems_carry_the_previous_segment_as_hf_does(tmp_path):
    hf, ours = hf_xlnet(tmp_path, mem_len=5)
    assert ours.config.mem_len == 5
    ids, perm_mask, target_mapping, token_type_ids = inputs()
    second = torch.roll(ids, 3, dims=1)
    with torch.no_grad():
        hf_first, our_first = hf(ids, use_mems=True), ours(ids)
        assert len(our_first.mems) == 2 and our_first.mems[0].shape == (BATCH, 5, 32)
        for mem, hf_mem in zip(our_first.mems, hf_first.mems):
            assert_close(mem, hf_mem.transpose(0, 1))
        kwargs = {"perm_mask": perm_mask, "target_mapping": target_mapping, "token_type_ids": token_type_ids}
        expected = hf(second, mems=hf_first.mems, use_mems=True, **kwargs).logits
        got = ours(second, mems=our_first.mems, **kwargs).logits
    assert_close(got, expected)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = PermutationLM(preset("xlnet-tiny", n_layer=2, d_model=32, d_inner=64, untie_r=False)).eval()
    ids, perm_mask, target_mapping, _ = inputs()
    model.save_pretrained(tmp_path / "ours")
    loaded = PermutationLM.from_pretrained(tmp_path / "ours").eval()
    assert loaded.config == model.config
    assert loaded.transformer.layer[1].rel_attn.r_w_bias is loaded.transformer.layer[0].rel_attn.r_w_bias
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, perm_mask=perm_mask, target_mapping=target_mapping).logits,
            model(ids, perm_mask=perm_mask, target_mapping=target_mapping).logits,
            rtol=0, atol=0,
        )


@pytest.mark.parametrize(
    "field, value", [("attn_type", "uni"), ("bi_data", True), ("reuse_len", 4), ("ff_activation", "tanh")]
)
def test_unsupported_hf_variants_name_the_field(tmp_path, field, value):
    config = transformers.XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=4, d_inner=64)
    setattr(config, field, value)
    config.save_pretrained(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=field):
        lnlm_ssm.from_pretrained(tmp_path)


def test_bad_shapes_name_the_argument():
    torch.manual_seed(0)
    model = PermutationLM(PermutationLMConfig(vocab_size=VOCAB, d_model=32, n_layer=1, n_head=4, d_inner=64))
    ids, perm_mask, target_mapping, _ = inputs()
    with pytest.raises(ValueError, match=r"perm_mask must be a tensor of shape \(2, 12, 12\)"):
        model(ids, perm_mask=perm_mask[:, :-1])
    with pytest.raises(ValueError, match=r"target_mapping must be a tensor of shape \(2, num_predict, 12\)"):
        model(ids, target_mapping=target_mapping[:, :, :-1])
    with pytest.raises(ValueError, match=r"target_mapping must be a tensor of shape \(2, num_predict, 12\)"):
        model(ids, target_mapping=target_mapping[0])
    with pytest.raises(ValueError, match="labels must be a tensor of shape"):
        model(ids, target_mapping=target_mapping, labels=ids)
    with pytest.raises(ValueError, match="mems must be a list of n_layer=1"):
        model(ids, mems=[])
