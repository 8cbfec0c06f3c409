"""Mamba-2 mixer: decode and chunked prefill against the full path, padding, gradients,
mamba_ssm's parameter names, HF transformers' Mamba2Mixer, backends, errors."""

import pytest
import torch

from lnlm_ssm.layers import Mamba2
from lnlm_ssm.layers.base import declared_parameter_names
from lnlm_ssm.utils.testing import assert_close
from mixer_cases import perturbed, prefill_then_steps

D_MODEL, D_STATE, D_CONV, HEADDIM, CHUNK, SEQLEN = 16, 4, 4, 8, 4, 11
D_INNER, NHEADS = 2 * D_MODEL, 2 * D_MODEL // HEADDIM
BACKENDS = ["reference", "cpu"]

# mamba_ssm's Mamba2 mixer keys (backbone.layers.N.mixer.*), from its checkpoints.
MAMBA_SSM_KEYS = {
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "dt_bias",
    "A_log",
    "D",
    "norm.weight",
    "out_proj.weight",
}

# The default layer; two groups with an ungated scan and per-channel D; a dt limit with the norm before the gate.
CONFIGS = {
    "default": {},
    "groups": {"ngroups": 2, "rmsnorm": False, "D_has_hdim": True, "bias": True},
    "dt_limit": {"dt_limit": (0.02, 0.06), "norm_before_gate": True},
}


def make_mamba2(dtype=torch.float64, backend="reference", **kwargs):
    """A tiny Mamba2 whose parameters are all perturbed."""
    layer = Mamba2(
        D_MODEL, d_state=D_STATE, d_conv=D_CONV, headdim=HEADDIM, chunk_size=CHUNK, dtype=dtype, backend=backend,
        **kwargs,
    )
    return perturbed(layer)


def hidden(batch=2, seqlen=SEQLEN, dtype=torch.float64):
    return torch.randn(batch, seqlen, D_MODEL, dtype=dtype)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_decode_steps_match_full_path(backend, config):
    layer = make_mamba2(backend=backend, **CONFIGS[config])
    h = hidden()
    full_cache = layer.allocate_cache(2, SEQLEN)
    full = layer(h, full_cache)
    assert_close(full, layer(h), msg="a cache started at zero changes nothing")
    stepped, cache = prefill_then_steps(layer, h, 0)
    assert_close(stepped, full)
    assert cache.seqlen == full_cache.seqlen == SEQLEN
    assert_close(cache.ssm_state, full_cache.ssm_state)
    assert_close(cache.conv_state, full_cache.conv_state)
    # The conv state is the last d_conv conv inputs (the xBC rows of in_proj), newest last.
    conv_inputs = layer.in_proj(h)[..., D_INNER : D_INNER + layer.conv_dim]
    assert_close(cache.conv_state, conv_inputs[:, -D_CONV:].transpose(1, 2))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("splits", [(3, 1, 7), (6, 5), (2, 9)])
@torch.no_grad()
def test_chunked_prefill_matches_full_path(splits, config):
    layer = make_mamba2(backend="cpu", **CONFIGS[config])
    h = hidden()
    full_cache = layer.allocate_cache(2, SEQLEN)
    full = layer(h, full_cache)
    cache = layer.allocate_cache(2, SEQLEN)
    chunks = [layer(part, cache) for part in h.split(list(splits), dim=1)]
    assert_close(torch.cat(chunks, dim=1), full)
    assert cache.seqlen == SEQLEN
    assert_close(cache.ssm_state, full_cache.ssm_state)
    assert_close(cache.conv_state, full_cache.conv_state)


@pytest.mark.parametrize("n_prefill", [SEQLEN, 6, 2])
@torch.no_grad()
def test_left_padding_leaves_no_trace(n_prefill):
    layer = make_mamba2(**CONFIGS["groups"])
    pad = 3
    h = hidden()
    mask = torch.ones(2, SEQLEN, dtype=torch.bool)
    mask[0, :pad] = False
    padded, padded_cache = prefill_then_steps(layer, h, n_prefill, mask=mask)
    alone, alone_cache = prefill_then_steps(layer, h[:1, pad:], max(n_prefill - pad, 0))
    assert_close(padded[:1, pad:], alone)
    assert_close(padded_cache.ssm_state[:1], alone_cache.ssm_state)
    assert_close(padded_cache.conv_state[:1], alone_cache.conv_state)
    unmasked, _ = prefill_then_steps(layer, h[1:], n_prefill)
    assert_close(padded[1:], unmasked, msg="an all-real row is untouched by the mask")
    assert_close(layer(h, mask=mask)[:1, pad:], alone, msg="mask without a cache")


@pytest.mark.parametrize("config", CONFIGS)
def test_gradients_reach_every_parameter(config):
    layer = make_mamba2(**CONFIGS[config])
    out = layer(hidden())
    (out * torch.randn_like(out)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_state_dict_is_mamba_ssm_layout():
    layer = Mamba2(D_MODEL, d_state=D_STATE, d_conv=D_CONV, headdim=HEADDIM, ngroups=2)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert set(shapes) == MAMBA_SSM_KEYS
    conv_dim = D_INNER + 2 * 2 * D_STATE
    assert shapes["in_proj.weight"] == (D_INNER + conv_dim + NHEADS, D_MODEL)
    assert shapes["conv1d.weight"] == (conv_dim, 1, D_CONV)
    assert shapes["dt_bias"] == shapes["A_log"] == shapes["D"] == (NHEADS,)
    assert shapes["norm.weight"] == (D_INNER,)
    assert shapes["out_proj.weight"] == (D_MODEL, D_INNER)
    no_norm = Mamba2(D_MODEL, d_state=D_STATE, headdim=HEADDIM, rmsnorm=False, D_has_hdim=True).state_dict()
    assert set(no_norm) == MAMBA_SSM_KEYS - {"norm.weight"}
    assert no_norm["D"].shape == (D_INNER,)


def test_init_as_mamba_ssm():
    layer = Mamba2(64, d_state=D_STATE, headdim=HEADDIM, A_init_range=(2, 3), dt_min=0.01, dt_max=0.05, conv_init=0.2)
    A = torch.exp(layer.A_log)
    assert ((A >= 2) & (A <= 3)).all()
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert ((dt >= 0.01 - 1e-6) & (dt <= 0.05 + 1e-6)).all()
    assert layer.conv1d.weight.abs().max() <= 0.2
    assert_close(layer.D, torch.ones(16))
    assert declared_parameter_names(layer, "no_weight_decay") == {'D', 'A_log', 'dt_bias'}


@pytest.mark.parametrize("ngroups", [1, 2])
@torch.no_grad()
def test_matches_hf_transformers_mamba2_mixer(ngroups):
    transformers = pytest.importorskip("transformers")
    config = transformers.Mamba2Config(
        hidden_size=D_MODEL,
        state_size=D_STATE,
        conv_kernel=D_CONV,
        expand=2,
        num_heads=NHEADS,
        head_dim=HEADDIM,
        n_groups=ngroups,
        chunk_size=CHUNK,
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=1e-3,
        num_hidden_layers=1,
    )
    theirs = transformers.models.mamba2.modeling_mamba2.Mamba2Mixer(config, layer_idx=0).eval()
    ours = make_mamba2(dtype=torch.float32, ngroups=ngroups, norm_eps=1e-3)
    theirs.load_state_dict(ours.state_dict())
    h = hidden(dtype=torch.float32)
    assert_close(ours(h), theirs(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@torch.no_grad()
def test_reference_and_cpu_backends_agree(dtype):
    ref = make_mamba2(dtype=dtype, backend="reference", **CONFIGS["groups"])
    cpu = make_mamba2(dtype=dtype, backend="cpu", **CONFIGS["groups"])
    cpu.load_state_dict(ref.state_dict())
    h = hidden(dtype=dtype)
    assert_close(cpu(h), ref(h))
    stepped_ref, cache_ref = prefill_then_steps(ref, h, 5)
    stepped_cpu, cache_cpu = prefill_then_steps(cpu, h, 5)
    assert_close(stepped_cpu, stepped_ref)
    assert_close(cache_cpu.ssm_state, cache_ref.ssm_state)


def test_cache_allocation():
    layer = Mamba2(D_MODEL, d_state=D_STATE, d_conv=D_CONV, headdim=HEADDIM, ngroups=2, dtype=torch.bfloat16)
    cache = layer.allocate_cache(3, 100)
    assert cache.conv_state.shape == (3, D_INNER + 4 * D_STATE, D_CONV)
    assert cache.conv_state.dtype == torch.bfloat16
    assert cache.ssm_state.shape == (3, NHEADS, HEADDIM, D_STATE) and cache.ssm_state.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"headdim": 5}, "headdim must divide d_inner"),
        ({"ngroups": 3}, "ngroups must divide nheads"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"A_init_range": (0, 16)}, "A_init_range"),
        ({"dt_limit": (0.1, 0.01)}, "dt_limit"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"backend": "gpu"}, "backend must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2(**{"d_model": D_MODEL, "d_state": D_STATE, "headdim": HEADDIM, **kwargs})


def test_bad_forward_arguments():
    layer = make_mamba2()
    h = hidden()
    with pytest.raises(ValueError, match="mask must have shape"):
        layer(h, mask=torch.ones(SEQLEN, dtype=torch.bool))
    cache = layer.allocate_cache(2, SEQLEN)
    layer(h[:, :4], cache)
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, past \+ seqlen\) = \(2, 4 \+ 2\)"):
        layer(h[:, 4:6], cache, mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden_states"):
        layer(h[0])
