"""HF transformers checkpoints (Mamba, Mamba-2, Llama, GPT-2) load into MambaLM and give HF's logits and greedy tokens."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

from lnlm_ssm.checkpoint import CheckpointError  # noqa: E402
from lnlm_ssm.models import from_pretrained as load_pretrained  # noqa: E402
from lnlm_ssm.utils.testing import assert_close  # noqa: E402

VOCAB = 64


def hf_mamba():
    return transformers.MambaForCausalLM(
        transformers.MambaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=3, use_bias=True
        )
    )


def hf_mamba2():
    # seqlen 13 below spans two chunks of 8; two groups of B/C and of the gated norm.
    return transformers.Mamba2ForCausalLM(
        transformers.Mamba2Config(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, n_groups=2,
            state_size=8, chunk_size=8, layer_norm_epsilon=1e-4,
        )
    )


def hf_llama(**overrides):
    # intermediate_size 48 is not a multiple of GatedMLP's 128: the loader pads fc1/fc2 with zeros.
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **overrides}))


def randomized(model):
    """HF's init (tiny Llama weights, D = 1, zero biases) would let a misplaced weight pass: add noise."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def hf_gpt2(**overrides):
    fields = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**fields, **overrides}))


BUILDERS = {
    "mamba": hf_mamba,
    "mamba2": hf_mamba2,
    "llama": hf_llama,
    "llama-tied-bias": lambda: hf_llama(tie_word_embeddings=True, attention_bias=True),
    "gpt2": hf_gpt2,
}

IDS = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def hf_model(request, tmp_path_factory):
    torch.manual_seed(0)
    model = randomized(BUILDERS[request.param]())
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory)
    return model, directory


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_logits_match(hf_model):
    hf, directory = hf_model
    ours = load_pretrained(directory).eval()
    assert ours.config.pad_vocab_size_multiple == 1
    expected = hf_logits(hf, IDS)
    assert our_logits(ours, IDS).shape == expected.shape == (2, 13, VOCAB)
    assert_close(our_logits(ours, IDS), expected)


def test_resaved_in_our_format_loads_the_same(hf_model, tmp_path):
    _, directory = hf_model
    ours = load_pretrained(directory)
    ours.save_pretrained(tmp_path)
    again = load_pretrained(tmp_path)
    assert again.config == ours.config
    for key, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], t), key


def test_greedy_generation_matches(hf_model):
    hf, directory = hf_model
    ours = load_pretrained(directory).eval()
    # No eos: both must produce exactly 8 tokens. An explicit mask: HF would take token 0 (pad) for padding.
    with torch.no_grad():
        expected = hf.generate(
            IDS,
            attention_mask=torch.ones_like(IDS),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        actual = ours.generate(IDS, max_new_tokens=8, temperature=0)
    assert expected.shape == (2, 21)
    assert torch.equal(actual, expected)


def test_sharded_safetensors(tmp_path):
    hf = randomized(hf_mamba2())
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert_close(our_logits(load_pretrained(tmp_path).eval(), IDS), hf_logits(hf, IDS))


def write_torch_bin(directory, model, shards):
    """The layout of transformers < 4.35: pytorch_model.bin, or shards + pytorch_model.bin.index.json."""
    model.config.save_pretrained(directory)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = keys[i::shards]
        torch.save({k: state[k] for k in part}, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("builder", [hf_mamba, hf_llama], ids=["mamba", "llama"])
def test_torch_bin_checkpoints(tmp_path, builder, shards):
    hf = randomized(builder())
    write_torch_bin(tmp_path, hf, shards)
    assert_close(our_logits(load_pretrained(tmp_path).eval(), IDS), hf_logits(hf, IDS))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-errors")
    hf_llama().save_pretrained(directory)
    return directory


def edit_config(directory, tmp_path, **changes):
    target = tmp_path / "edited"
    target.mkdir()
    for path in directory.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "RoPE scaling"),
        # transformers < 5 spelling
        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"num_key_value_heads": 4}, r"in_proj.weight: expected \(96, 32\), found \(64, 32\)"),
    ],
)
def test_llama_config_errors(llama_dir, tmp_path, changes, match):
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(edit_config(llama_dir, tmp_path, **changes))


def test_llama_missing_projection_is_named(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    target = edit_config(llama_dir, tmp_path)
    state = load_file(target / "model.safetensors")
    del state["model.layers.1.self_attn.v_proj.weight"]
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks \['model.layers.1.self_attn.v_proj.weight'\]"):
        load_pretrained(target)


def test_mamba2_head_count_must_fill_d_inner(tmp_path):
    directory = tmp_path / "m2"
    hf_mamba2().save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["num_heads"] = 4
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"num_heads \* head_dim \(4 \* 8\) must equal expand \* hidden_size"):
        load_pretrained(directory)


def test_llama_rope_theta_in_the_transformers_4_spelling(tmp_path):
    hf = randomized(hf_llama())
    hf.save_pretrained(tmp_path / "v5")
    old_style = edit_config(tmp_path / "v5", tmp_path, rope_parameters=None, rope_theta=500.0, rope_scaling=None)
    ours = load_pretrained(old_style).eval()
    assert ours.config.attn_cfg["rotary_emb_base"] == 500.0
    assert_close(our_logits(ours, IDS), hf_logits(hf, IDS))
