"""MambaLM: shapes, loss, parameter layout, initialisation, hybrids, padding, validation."""

import math

import pytest
import torch
import torch.nn.functional as F

from lnlm_ssm.models import MambaLM, MambaLMConfig
from lnlm_ssm.models.config import ConfigError
from lnlm_ssm.utils.testing import assert_close

ATTN_CFG = {"num_heads": 4, "rotary_emb_dim": 8}
MAMBA2_CFG = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}
CONFIGS = {
    "mamba1": dict(ssm_cfg={"d_state": 8}),
    "mamba2": dict(ssm_cfg=MAMBA2_CFG),
    "attention": dict(layer_pattern="A", attn_cfg=ATTN_CFG, d_intermediate=48),
    "hybrid": dict(layer_pattern="MA", ssm_cfg=MAMBA2_CFG, attn_cfg=ATTN_CFG),
}


def tiny(kind="mamba1", **overrides):
    fields = dict(d_model=32, n_layer=2, vocab_size=256, **CONFIGS[kind])
    fields.update(overrides)
    return MambaLM(MambaLMConfig(**fields))


def test_public_import():
    from lnlm_ssm import MambaLM as top_level
    from lnlm_ssm import MambaLMConfig as config_cls

    assert top_level is MambaLM and config_cls is MambaLMConfig


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_shapes_and_num_last_tokens(kind):
    # vocab 250 pads to 256 embedding rows; logits must drop the 6 padded rows.
    model = tiny(kind, vocab_size=250)
    assert model.backbone.embedding.weight.shape == (256, 32)
    ids = torch.randint(0, 250, (2, 13))
    full = model(ids).logits
    assert full.shape == (2, 13, 250)
    last = model(ids, num_last_tokens=3).logits
    assert last.shape == (2, 3, 250)
    assert_close(last, full[:, -3:])
    assert_close(model(inputs_embeds=model.backbone.embedding(ids)).logits, full)


def test_loss_is_shifted_cross_entropy_ignoring_padding_and_minus_100():
    model = tiny()
    ids = torch.randint(0, 256, (2, 9))
    labels = ids.clone()
    labels[1, 5] = -100
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    out = model(ids, labels=labels, attention_mask=mask)
    log_probs = torch.log_softmax(out.logits.double(), dim=-1)
    terms = [
        -log_probs[b, t - 1, labels[b, t]]
        for b in range(2)
        for t in range(1, 9)
        if labels[b, t] != -100 and mask[b, t] == 1
    ]
    assert len(terms) == 2 * 8 - 2 - 1  # targets 1, 2 of row 0 are padding; target 5 of row 1 is -100
    assert_close(out.loss, torch.stack(terms).mean().float())


def test_state_dict_keys_are_mamba_ssm_layout():
    model = tiny("mamba1", d_intermediate=40, n_layer=2)
    keys = set(model.state_dict())
    for i in range(2):
        for name in ("norm.weight", "norm2.weight", "mlp.fc1.weight", "mlp.fc2.weight", "mixer.in_proj.weight",
                     "mixer.conv1d.weight", "mixer.x_proj.weight", "mixer.dt_proj.bias", "mixer.A_log",
                     "mixer.D", "mixer.out_proj.weight"):
            assert f"backbone.layers.{i}.{name}" in keys
    assert {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"} <= keys
    assert all(k.startswith(("backbone.embedding.", "backbone.layers.", "backbone.norm_f.", "lm_head.")) for k in keys)
    assert model.lm_head.weight is model.backbone.embedding.weight
    untied = tiny("mamba1", tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.backbone.embedding.weight.data_ptr()


def test_initialisation():
    n_layer = 4
    model = tiny("hybrid", n_layer=n_layer, d_intermediate=64, d_model=64)
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 0.002
    attn = model.backbone.layers[1].mixer
    assert attn.in_proj.bias.abs().max() == 0 and attn.out_proj.bias.abs().max() == 0
    for layer in model.backbone.layers:
        for proj in (layer.mixer.out_proj, layer.mlp.fc2):
            # nn.Linear's default init is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), then scaled by 1/sqrt(2 * n_layer).
            bound = 1 / math.sqrt(proj.in_features) / math.sqrt(2 * n_layer)
            w = proj.weight.abs().max().item()
            assert 0.8 * bound < w <= bound
    # Mamba-1's dt bias (softplus^-1 of dt in [dt_min, dt_max]) survives the model's bias zeroing.
    mamba1 = tiny("mamba1")
    assert (mamba1.backbone.layers[0].mixer.dt_proj.bias != 0).all()


HYBRIDS = {
    # Mamba-2 takes d_state from the shared ssm_cfg and its default headdim 64 (one head).
    "pattern 12A": (dict(layer_pattern="12A", ssm_cfg={"d_state": 8}), ["Mamba", "Mamba2", "Attention"]),
    "attn_layer_idx [1]": (dict(attn_layer_idx=[1], ssm_cfg=MAMBA2_CFG), ["Mamba2", "Attention", "Mamba2"]),
}


@pytest.mark.parametrize("name", sorted(HYBRIDS))
def test_hybrid_forward_backward_reaches_every_parameter(name):
    fields, expected_types = HYBRIDS[name]
    config = MambaLMConfig(d_model=32, n_layer=3, vocab_size=256, d_intermediate=32, attn_cfg=ATTN_CFG, **fields)
    model = MambaLM(config)
    assert [type(block.mixer).__name__ for block in model.backbone.layers] == expected_types
    ids = torch.randint(0, 256, (2, 10))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_layer_norm_config():
    model = tiny("mamba1", rms_norm=False)
    assert "backbone.layers.0.norm.bias" in model.state_dict()
    norm = model.backbone.norm_f
    x, residual = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    y, new_residual = norm(x, residual=residual, prenorm=True, residual_in_fp32=True)
    assert_close(new_residual, x + residual)
    assert_close(y, F.layer_norm(x + residual, (32,), norm.weight, norm.bias, norm.eps))
    ids = torch.randint(0, 256, (1, 6))
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_left_padding_does_not_change_real_positions(kind):
    model = tiny(kind)
    ids = torch.randint(0, 256, (1, 7))
    alone = model(ids).logits
    padded = torch.cat([torch.randint(0, 256, (1, 4)), ids], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 7])
    assert_close(model(padded, attention_mask=mask).logits[:, 4:], alone)


def test_from_name_and_from_config():
    model = MambaLM.from_name("mamba2-130m", d_model=32, n_layer=2, vocab_size=256, ssm_cfg=MAMBA2_CFG)
    assert type(model.backbone.layers[0].mixer).__name__ == "Mamba2"
    assert MambaLM.from_config(model.config).config == model.config


def test_bad_input_errors():
    model = tiny()
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model(ids, inputs_embeds=torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="num_last_tokens"):
        model(ids, labels=ids, num_last_tokens=1)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(TypeError, match="config"):
        MambaLM({"d_model": 32})
    with pytest.raises(ValueError, match="ssm_cfg"):
        MambaLM(MambaLMConfig(d_model=32, n_layer=1, vocab_size=256, ssm_cfg={"headdim": 16}))


@pytest.mark.parametrize("name", ["rms_norm", "residual_in_fp32", "tie_embeddings", "mlp_bias"])
def test_config_flags_must_be_bools(name):
    # A hand-edited config.json's "False" is truthy: taken as given it would build the other model.
    with pytest.raises(ConfigError, match=f"{name} must be a bool \\(true or false\\), got 'False'"):
        MambaLMConfig(d_model=32, n_layer=1, vocab_size=256, **{name: "False"})
