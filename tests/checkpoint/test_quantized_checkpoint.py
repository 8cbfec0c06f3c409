"""Quantised checkpoints: save_pretrained / from_pretrained round trips, what is stored, and the refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lnlm_ssm
from lnlm_ssm.checkpoint import CheckpointError
from lnlm_ssm.layers import QuantizedEmbedding, QuantizedLinear, quantize_
from lnlm_ssm.models import ConfigError, MambaLM, MambaLMConfig

MODES = ["int8", "bf16"]
CONFIGS = {
    "mamba1": dict(d_model=32, n_layer=2, vocab_size=250, ssm_cfg={"d_state": 8}),
    "hybrid": dict(
        d_model=32,
        n_layer=2,
        vocab_size=250,
        d_intermediate=48,
        layer_pattern="MA",
        ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8},
        attn_cfg={"num_heads": 4, "rotary_emb_dim": 8},
        tie_embeddings=False,
    ),
}


def quantized(name, mode):
    torch.manual_seed(0)
    return quantize_(MambaLM(MambaLMConfig(**CONFIGS[name])).eval(), mode)


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_gives_identical_logits_and_tokens(tmp_path, name, mode):
    model = quantized(name, mode)
    model.save_pretrained(tmp_path)
    loaded = lnlm_ssm.from_pretrained(tmp_path).eval()
    assert loaded.quantization == mode and isinstance(loaded.lm_head, QuantizedLinear)
    assert isinstance(loaded.backbone.embedding, QuantizedEmbedding)
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight or not model.config.tie_embeddings
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(saved[k].dtype == restored[k].dtype and torch.equal(saved[k], restored[k]) for k in saved)
    ids = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    prompt = ids[:, :4]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=6, temperature=0),
                       model.generate(prompt, max_new_tokens=6, temperature=0))
    assert torch.equal(MambaLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


@pytest.mark.parametrize("mode", MODES)
def test_stored_tensors_are_the_quantised_ones(tmp_path, mode):
    model = quantized("mamba1", mode)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"] == mode
    tensors = load_file(tmp_path / "model.safetensors")
    stored = torch.int8 if mode == "int8" else torch.bfloat16
    assert tensors["backbone.embedding.weight"].dtype == stored
    assert "lm_head.weight" not in tensors and "lm_head.weight_scale" not in tensors  # tied: stored once
    for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
        key = f"backbone.layers.1.mixer.{name}"
        assert tensors[f"{key}.weight"].dtype == stored
        assert (f"{key}.weight_scale" in tensors) == (mode == "int8")
    scales = [t for k, t in tensors.items() if k.endswith("weight_scale")]
    assert all(t.dtype == torch.float32 and t.ndim == 1 for t in scales)
    assert tensors["backbone.layers.1.mixer.A_log"].dtype == torch.float32
    card = (tmp_path / "README.md").read_text()
    assert f"quantised to {mode} (weight-only)" in card


def test_versions_without_quantisation_refuse_the_checkpoint(tmp_path):
    # What a version of lnlm_ssm that predates quantisation does with config.json: read its fields as a
    # MambaLMConfig, which refuses the unknown one by name instead of building a float model.
    quantized("mamba1", "int8").save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architecture", "lnlm_ssm_version")}
    with pytest.raises(ConfigError, match=r"unknown MambaLMConfig fields \['quantization'\]"):
        MambaLMConfig.from_dict(fields)


@pytest.mark.parametrize("strict", [True, False])
def test_int8_weights_without_the_record_are_refused(tmp_path, strict):
    # A config.json that lost its "quantization": int8 values must not load into float weights.
    quantized("mamba1", "int8").save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["quantization"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="backbone.embedding.weight: the model holds float32, the checkpoint int8"):
        lnlm_ssm.from_pretrained(tmp_path, strict=strict)


def test_float_weights_under_an_int8_record_are_refused(tmp_path):
    torch.manual_seed(0)
    MambaLM(MambaLMConfig(**CONFIGS["mamba1"])).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["quantization"] = "int8"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="the model holds int8, the checkpoint float32"):
        lnlm_ssm.from_pretrained(tmp_path, strict=False)


def test_unknown_mode_and_dtype_are_refused(tmp_path):
    quantized("mamba1", "bf16").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="computes in float32; got dtype=torch.bfloat16"):
        lnlm_ssm.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert lnlm_ssm.from_pretrained(tmp_path, dtype=torch.float32).quantization == "bf16"
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["quantization"] = "int4"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"quantization 'int4'.*knows \['int8', 'bf16'\]"):
        lnlm_ssm.from_pretrained(tmp_path)


def test_a_float_checkpoint_has_no_record(tmp_path):
    torch.manual_seed(0)
    MambaLM(MambaLMConfig(**CONFIGS["mamba1"])).save_pretrained(tmp_path)
    assert "quantization" not in json.loads((tmp_path / "config.json").read_text())
    assert lnlm_ssm.from_pretrained(tmp_path).quantization is None
