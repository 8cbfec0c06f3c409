"""GPT-2 as a MambaLM: learned positions, LayerNorms, a plain GELU MLP; its variants, preset, training and decoding.

Logits, re-saving and greedy tokens against HF's GPT2LMHeadModel are in tests/checkpoint/test_hf_interop.py.
"""

import json

import pytest
import torch

import lnlm_ssm
from lnlm_ssm.checkpoint import CheckpointError
from lnlm_ssm.layers.block_step import FusedStepUnsupported
from lnlm_ssm.layers.mlp import MLP
from lnlm_ssm.models import MambaLM, preset

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")


def hf_gpt2(**overrides):
    fields = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=24, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**fields, **overrides}))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("field", ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"])
def test_unsupported_variants_name_the_field(tmp_path, field):
    hf_gpt2().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=field):
        lnlm_ssm.from_pretrained(tmp_path)


def test_unscaled_attention_and_an_inner_size(tmp_path):
    hf = hf_gpt2(scale_attn_weights=False, n_inner=40, activation_function="gelu")
    hf.save_pretrained(tmp_path)
    ours = lnlm_ssm.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = hf(ids).logits, ours(ids).logits
    assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 1e-4


def test_positions_beyond_the_table_are_an_error(tmp_path):
    hf_gpt2().save_pretrained(tmp_path)
    ours = lnlm_ssm.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, max_position_embeddings=24\)"):
        ours(torch.zeros(1, 25, dtype=torch.long))


def test_gpt2_tiny_preset_trains_and_decodes():
    torch.manual_seed(0)
    model = MambaLM(preset("gpt2-tiny"))
    assert 0.8e6 <= sum(p.numel() for p in model.parameters()) <= 1.2e6
    assert isinstance(model.backbone.layers[0].mlp, MLP) and model.backbone.position_embedding is not None
    ids = torch.randint(0, 257, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.backbone.position_embedding.weight.grad.abs().sum() > 0
    model.eval()
    # Decoding with a cache gives the logits of the full forward at every new position.
    out = model.generate(ids[:, :6], max_new_tokens=5, temperature=0)
    with torch.no_grad():
        full = model(out[:, :-1]).logits[:, 5:]
    assert torch.equal(full.argmax(-1), out[:, 6:])
    cache = model.allocate_cache(2, 8)
    with pytest.raises(FusedStepUnsupported, match="learned position"):
        model.fused_decoder(cache)


def test_left_padded_greedy_generation_matches_hf(tmp_path):
    # Positions count a row's real tokens (as HF's generate does), so padding does not shift them.
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path)
    ours = lnlm_ssm.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    with torch.no_grad():
        expected = hf.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        actual = ours.generate(ids, attention_mask=mask, max_new_tokens=6, temperature=0)
    assert expected.shape == (2, 16)
    assert torch.equal(actual, expected)
