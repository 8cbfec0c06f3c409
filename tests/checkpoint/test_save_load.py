"""save_pretrained / load_pretrained: bit-exact round trips, atomic writes, mamba_ssm's layout, clear errors."""

import json
import os
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from lnlm_ssm.models import MambaLMConfig
from lnlm_ssm.checkpoint import CheckpointError, read_checkpoint, save_pretrained
from lnlm_ssm.checkpoint import save as ckpt
from lnlm_ssm.models import MambaLM
from lnlm_ssm.models import from_pretrained as load_pretrained

CONFIGS = {
    "mamba1": dict(d_model=16, n_layer=2, vocab_size=37, ssm_cfg={"layer": "Mamba1", "d_state": 4}),
    "mamba2": dict(
        d_model=16,
        n_layer=2,
        vocab_size=37,
        # inf is not strict JSON: config.json must still be readable by any JSON parser.
        ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8, "dt_limit": [0.0, float("inf")]},
    ),
    "hybrid": dict(
        d_model=16,
        n_layer=2,
        vocab_size=37,
        d_intermediate=24,
        layer_pattern="MA",
        ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8},
        attn_cfg={"num_heads": 2, "head_dim": 8, "rotary_emb_dim": 8},
        tie_embeddings=False,
    ),
    "attention": dict(
        d_model=16,
        n_layer=2,
        vocab_size=37,
        d_intermediate=40,
        layer_pattern="A",
        attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 4, "qkv_proj_bias": False},
        pad_vocab_size_multiple=16,
    ),
}


def make_model(name, **overrides):
    model = MambaLM(MambaLMConfig(**{**CONFIGS[name], **overrides}))
    with torch.no_grad():
        # Initial values such as D = 1 or zero biases would hide a weight that was never loaded.
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def assert_same_model(loaded, model):
    assert loaded.config == model.config
    expected, actual = model.state_dict(), loaded.state_dict()
    assert actual.keys() == expected.keys()
    for key, t in expected.items():
        assert actual[key].dtype == t.dtype, key
        assert torch.equal(actual[key], t), key


def fail_replacing(monkeypatch, name):
    """Make the rename of a file called ``name`` into place fail, as a power cut at that moment would."""
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(name):
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


IDS = torch.randint(0, 37, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_bit_exact(tmp_path, name):
    model = make_model(name)
    save_pretrained(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["README.md", "config.json", "model.safetensors"]

    loaded = load_pretrained(tmp_path / "ckpt").eval()
    assert_same_model(loaded, model)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))

    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    if model.config.tie_embeddings:
        assert "lm_head.weight" not in stored
        assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    else:
        assert torch.equal(stored["lm_head.weight"], model.lm_head.weight)
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text(), parse_constant=reject_non_json)
    assert written["model_type"] == "lnlm_ssm" and written["lnlm_ssm_version"]


def reject_non_json(name):
    raise AssertionError(f"config.json holds {name}, which strict JSON does not allow")


def test_model_methods_round_trip_and_dtype(tmp_path):
    model = make_model("mamba2")
    model.save_pretrained(tmp_path)
    assert_same_model(MambaLM.from_pretrained(tmp_path), model)

    as_f64 = load_pretrained(tmp_path, dtype=torch.float64)
    for key, t in model.state_dict().items():
        assert torch.equal(as_f64.state_dict()[key], t.double()), key

    # dtype=None follows the stored dtype.
    save_pretrained(make_model("mamba1").to(torch.bfloat16), tmp_path / "bf16")
    assert load_pretrained(tmp_path / "bf16").backbone.embedding.weight.dtype == torch.bfloat16


# Importing torch._dynamo warns about torch.jit internals; nothing here uses them.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_model_saves_without_the_wrapper_prefix(tmp_path):
    model = make_model("mamba1")
    save_pretrained(torch.compile(model), tmp_path)
    assert_same_model(load_pretrained(tmp_path), model)


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old, new = make_model("mamba1"), make_model("mamba1")
    save_pretrained(old, tmp_path)

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(new, tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert_same_model(load_pretrained(tmp_path), old)


def test_interrupted_replace_never_pairs_a_config_with_other_weights(tmp_path, monkeypatch):
    old = make_model("mamba1")
    save_pretrained(old, tmp_path)
    new = make_model("mamba2")
    fail_replacing(monkeypatch, "config.json")
    with pytest.raises(OSError, match="power cut"):
        save_pretrained(new, tmp_path)
    monkeypatch.undo()
    # New weights are in place without a config: refused, not loaded as the old mamba1 config.
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(tmp_path)
    save_pretrained(new, tmp_path)
    assert_same_model(load_pretrained(tmp_path), new)


def test_a_save_writes_a_model_card(tmp_path):
    model = make_model("mamba1")
    save_pretrained(model, tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: lnlm_ssm\n---\n" + ckpt.CARD_MARKER + "\n\n# MambaLM\n")
    # The tied head is one parameter: the count is what the weights file stores.
    count = sum(t.numel() for t in load_file(tmp_path / "model.safetensors").values())
    assert sum(p.numel() for p in model.parameters()) == count
    assert f"A MambaLM with {count:,} parameters, saved by lnlm_ssm " in card
    assert "```json\n" + (tmp_path / "config.json").read_text() + "```\n" in card
    assert "## Training" not in card


def test_the_card_lists_the_given_facts_in_order(tmp_path):
    make_model("mamba2").save_pretrained(
        tmp_path, card={"data": "`corpus/`", "tokens seen": 1234567, "final eval_loss": 1.23456789, "resumed": False}
    )
    card = (tmp_path / "README.md").read_text()
    assert card.endswith(
        "\n## Training\n\n- data: `corpus/`\n- tokens seen: 1,234,567\n- final eval_loss: 1.23457\n- resumed: False\n"
    )


def test_a_save_replaces_its_own_card_and_keeps_anyone_elses(tmp_path):
    save_pretrained(make_model("mamba1"), tmp_path, card={"steps": 1})
    hybrid = make_model("hybrid")
    save_pretrained(hybrid, tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert f"with {sum(p.numel() for p in hybrid.parameters()):,} parameters" in card and "steps" not in card
    assert '"layer_pattern": "MA"' in card

    # Someone's own README.md, and our card with the marker line removed (kept edits), stay as they are.
    for own in ("# My model\n\nNotes I wrote.\n", card.replace(ckpt.CARD_MARKER + "\n", "")):
        (tmp_path / "README.md").write_text(own)
        model = make_model("mamba2")
        with pytest.warns(UserWarning, match="README.md was not written by save_pretrained: it is kept"):
            save_pretrained(model, tmp_path)
        assert (tmp_path / "README.md").read_text() == own
        assert_same_model(load_pretrained(tmp_path), model)


def test_loading_ignores_the_card(tmp_path):
    model = make_model("mamba1")
    save_pretrained(model, tmp_path)
    (tmp_path / "README.md").write_bytes(b"\xff\x00 not text, not a card")
    assert_same_model(load_pretrained(tmp_path), model)


def test_a_failed_card_write_leaves_the_new_checkpoint_without_a_card(tmp_path, monkeypatch):
    save_pretrained(make_model("mamba1"), tmp_path)
    new = make_model("mamba2")
    fail_replacing(monkeypatch, "README.md")
    with pytest.raises(OSError, match="power cut"):
        save_pretrained(new, tmp_path)
    monkeypatch.undo()
    # Not the old card beside the new weights.
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert_same_model(load_pretrained(tmp_path), new)


def test_save_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_pretrained(make_model("mamba1"), tmp_path / "file")
    with pytest.raises(TypeError, match="MambaLM"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")
    untied = make_model("mamba1")
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone() + 1)
    with pytest.raises(CheckpointError, match="tie_embeddings"):
        save_pretrained(untied, tmp_path / "untied")


# ------------------------------------------------------------------ mamba_ssm's layout


def write_mamba_ssm_checkpoint(directory, model, config_fields):
    """config.json as mamba_ssm's MambaConfig writes it, and torch.save of the state dict (tied head twice)."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config_fields))
    torch.save(model.state_dict(), directory / "pytorch_model.bin")


MAMBA_SSM_FULL = dict(
    d_intermediate=0,
    attn_layer_idx=[],
    attn_cfg={},
    rms_norm=True,
    residual_in_fp32=True,
    fused_add_norm=True,
    pad_vocab_size_multiple=8,
    tie_embeddings=True,
)


@pytest.mark.parametrize(
    "config_fields",
    [
        # state-spaces/mamba-130m's config.json: only some fields, ssm_cfg empty (Mamba-1).
        dict(d_model=16, n_layer=2, vocab_size=37, ssm_cfg={"d_state": 4}, rms_norm=True, residual_in_fp32=True,
             fused_add_norm=True, pad_vocab_size_multiple=8),
        dict(MAMBA_SSM_FULL, d_model=16, n_layer=2, vocab_size=37,
             ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8}),
        dict(MAMBA_SSM_FULL, d_model=16, n_layer=3, vocab_size=37, d_intermediate=24, attn_layer_idx=[1],
             ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
             attn_cfg={"num_heads": 2, "head_dim": 8, "rotary_emb_dim": 8, "causal": True, "d_conv": 0, "mlp_dim": 0,
                       "qkv_proj_bias": True, "out_proj_bias": True}),
    ],
    ids=["mamba1-130m-style", "mamba2", "hybrid"],
)
def test_mamba_ssm_layout_loads(tmp_path, config_fields):
    ours = {k: v for k, v in config_fields.items() if k != "fused_add_norm"}
    ours["attn_cfg"] = {k: v for k, v in ours.get("attn_cfg", {}).items() if k != "mlp_dim"}
    model = MambaLM(MambaLMConfig(**ours))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.eval()
    write_mamba_ssm_checkpoint(tmp_path / "m", model, config_fields)

    loaded = load_pretrained(tmp_path / "m").eval()
    assert loaded.config.layer_types() == model.config.layer_types()
    assert_same_model(loaded, model)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_mamba_ssm_tied_head_must_be_the_embedding(tmp_path):
    model = make_model("mamba1")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] += 1
    (tmp_path / "config.json").write_text(json.dumps(dict(MAMBA_SSM_FULL, **CONFIGS["mamba1"])))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_pretrained(tmp_path)


# ------------------------------------------------------------------ errors


@pytest.fixture
def saved(tmp_path):
    model = make_model("mamba1")
    save_pretrained(model, tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def test_missing_key_is_listed_and_strict_false_keeps_init(saved):
    directory, model = saved
    rewrite_weights(directory, lambda s: s.pop("backbone.layers.1.mixer.D"))
    with pytest.raises(CheckpointError, match=r"missing keys \['backbone.layers.1.mixer.D'\], unexpected keys \[\]"):
        load_pretrained(directory)
    loaded = load_pretrained(directory, strict=False)
    assert torch.equal(loaded.backbone.layers[0].mixer.D, model.backbone.layers[0].mixer.D)
    assert not torch.equal(loaded.backbone.layers[1].mixer.D, model.backbone.layers[1].mixer.D)


def test_unexpected_key_is_listed(saved):
    directory, model = saved
    rewrite_weights(directory, lambda s: s.update({"backbone.layers.0.mixer.extra": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['backbone.layers.0.mixer.extra'\]"):
        load_pretrained(directory)
    assert_same_model(load_pretrained(directory, strict=False), model)


def test_shape_mismatch_names_key_and_shapes(saved):
    directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    config["ssm_cfg"]["d_state"] = 5
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"backbone.layers.0.mixer.A_log: expected \(32, 5\), found \(32, 4\)"):
        load_pretrained(directory, strict=False)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"model_type": "jamba", "hidden_size": 8}, "model_type 'jamba'"),
        ({"hidden": 8, "layers": 2}, r"fields \['hidden', 'layers'\]"),
        ({"model_type": "lnlm_ssm", "d_model": 8, "n_layer": 2, "colour": "red"}, "colour"),
        ([1, 2], "JSON object"),
    ],
)
def test_unknown_layouts_say_what_was_found(saved, config, match):
    directory, _ = saved
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(directory)


@pytest.mark.parametrize(
    "filename, damage",
    [
        ("model.safetensors", lambda b: b[: len(b) // 2]),
        ("model.safetensors", lambda b: b"\xff" * 64),
        ("config.json", lambda b: b[:-5]),
    ],
)
def test_corrupt_files_are_named(saved, filename, damage):
    directory, _ = saved
    path = directory / filename
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=filename):
        load_pretrained(directory)


def test_corrupt_torch_bin_is_named(saved):
    directory, _ = saved
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not a zip or a pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_pretrained(directory)


def test_missing_files(saved, tmp_path):
    directory, _ = saved
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights .* found \['README.md', 'config.json'\]"):
        load_pretrained(directory)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="needs a config.json"):
        load_pretrained(directory)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(tmp_path / "weights.bin")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "no" / "such" / "dir")
    with pytest.raises(TypeError, match="dtype"):
        load_pretrained(directory, dtype="float32")


def test_sharded_index_listing_absent_weights(saved):
    directory, _ = saved
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:3]}, directory / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in keys[3:]}, directory / "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys[:3]}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in keys[3:]})
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    assert read_checkpoint(directory)[1].keys() == state.keys()

    weight_map["backbone.ghost"] = "model-00002-of-00002.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="backbone.ghost"):
        load_pretrained(directory)


# ------------------------------------------------------------------ hub ids (no network: a fake huggingface_hub)


def test_repo_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match="install huggingface_hub"):
        load_pretrained("some-org/some-model")


def test_repo_id_is_downloaded_with_snapshot_download(saved, monkeypatch):
    directory, model = saved
    calls = []

    def snapshot_download(repo_id, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(directory)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    assert_same_model(load_pretrained("some-org/some-model"), model)
    assert calls == [("some-org/some-model", ["*.json", "*.safetensors"])]
