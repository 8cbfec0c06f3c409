"""Mamba-1 mixer: decode and chunked prefill against the full path, padding, gradients,
mamba_ssm's parameter names, HF transformers' MambaMixer, backends, errors; and the layer caches."""

import math

import pytest
import torch

from lnlm_ssm.layers import Mamba, MambaCache
from lnlm_ssm.layers.cache import AttentionCache, Mamba2Cache
from lnlm_ssm.layers.base import declared_parameter_names
from lnlm_ssm.utils.testing import assert_close
from mixer_cases import perturbed, prefill_then_steps

D_MODEL, D_STATE, D_CONV, SEQLEN = 8, 4, 4, 9
BACKENDS = ["reference", "cpu"]

# mamba_ssm's Mamba mixer keys (backbone.layers.N.mixer.*), from its checkpoints.
MAMBA_SSM_KEYS = {
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "A_log",
    "D",
    "out_proj.weight",
}


def make_mamba(dtype=torch.float64, backend="reference", **kwargs):
    """A tiny Mamba whose parameters are all perturbed."""
    return perturbed(Mamba(D_MODEL, d_state=D_STATE, d_conv=D_CONV, dtype=dtype, backend=backend, **kwargs))


def hidden(batch=2, seqlen=SEQLEN, dtype=torch.float64):
    return torch.randn(batch, seqlen, D_MODEL, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@torch.no_grad()
def test_decode_steps_match_full_path(backend):
    layer = make_mamba(backend=backend)
    h = hidden()
    full_cache = layer.allocate_cache(2, SEQLEN)
    full = layer(h, full_cache)
    assert_close(full, layer(h), msg="a cache started at zero changes nothing")
    stepped, cache = prefill_then_steps(layer, h, 0)
    assert_close(stepped, full)
    assert cache.seqlen == full_cache.seqlen == SEQLEN
    assert_close(cache.ssm_state, full_cache.ssm_state)
    assert_close(cache.conv_state, full_cache.conv_state)
    # The conv state is the last d_conv conv inputs (the x half of in_proj), newest last.
    conv_inputs = layer.in_proj(h)[..., : layer.d_inner]
    assert_close(cache.conv_state, conv_inputs[:, -D_CONV:].transpose(1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("splits", [(3, 1, 5), (5, 4), (2, 7)])
@torch.no_grad()
def test_chunked_prefill_matches_full_path(backend, splits):
    layer = make_mamba(backend=backend, bias=True)
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
    layer = make_mamba()
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


def test_gradients_reach_every_parameter():
    layer = make_mamba(bias=True)
    out = layer(hidden())
    (out * torch.randn_like(out)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_state_dict_is_mamba_ssm_layout():
    layer = Mamba(D_MODEL, d_state=D_STATE, d_conv=D_CONV)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert set(shapes) == MAMBA_SSM_KEYS
    d_inner, dt_rank = 2 * D_MODEL, math.ceil(D_MODEL / 16)
    assert shapes["in_proj.weight"] == (2 * d_inner, D_MODEL)
    assert shapes["conv1d.weight"] == (d_inner, 1, D_CONV)
    assert shapes["x_proj.weight"] == (dt_rank + 2 * D_STATE, d_inner)
    assert shapes["dt_proj.weight"] == (d_inner, dt_rank)
    assert shapes["A_log"] == (d_inner, D_STATE)
    assert shapes["out_proj.weight"] == (D_MODEL, d_inner)


def test_init_as_mamba_ssm():
    layer = Mamba(32, d_state=D_STATE, dt_min=0.01, dt_max=0.05)
    assert_close(layer.A_log, torch.log(torch.arange(1.0, D_STATE + 1)).expand(64, D_STATE))
    assert_close(layer.D, torch.ones(64))
    dt = torch.nn.functional.softplus(layer.dt_proj.bias)
    assert ((dt >= 0.01 - 1e-6) & (dt <= 0.05 + 1e-6)).all()
    bound = layer.dt_rank**-0.5
    assert layer.dt_proj.weight.abs().max() <= bound
    assert declared_parameter_names(layer, "no_weight_decay") == {'D', 'A_log'}
    assert declared_parameter_names(layer, "keep_init") == {"dt_proj.bias"}


@torch.no_grad()
def test_matches_hf_transformers_mamba_mixer():
    transformers = pytest.importorskip("transformers")
    config = transformers.MambaConfig(
        hidden_size=D_MODEL,
        state_size=D_STATE,
        conv_kernel=D_CONV,
        expand=2,
        time_step_rank=math.ceil(D_MODEL / 16),
        use_bias=False,
        use_conv_bias=True,
        num_hidden_layers=1,
    )
    theirs = transformers.models.mamba.modeling_mamba.MambaMixer(config, layer_idx=0)
    ours = make_mamba(dtype=torch.float32)
    theirs.load_state_dict(ours.state_dict())
    h = hidden(dtype=torch.float32)
    assert_close(ours(h), theirs(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@torch.no_grad()
def test_reference_and_cpu_backends_agree(dtype):
    ref = make_mamba(dtype=dtype, backend="reference")
    cpu = make_mamba(dtype=dtype, backend="cpu")
    cpu.load_state_dict(ref.state_dict())
    h = hidden(dtype=dtype)
    assert_close(cpu(h), ref(h))
    stepped_ref, cache_ref = prefill_then_steps(ref, h, 5)
    stepped_cpu, cache_cpu = prefill_then_steps(cpu, h, 5)
    assert_close(stepped_cpu, stepped_ref)
    assert_close(cache_cpu.ssm_state, cache_ref.ssm_state)


def test_cache_allocation():
    layer = Mamba(D_MODEL, d_state=D_STATE, d_conv=D_CONV, dtype=torch.bfloat16)
    cache = layer.allocate_cache(3, 100)
    assert cache.conv_state.shape == (3, 2 * D_MODEL, D_CONV) and cache.conv_state.dtype == torch.bfloat16
    assert cache.ssm_state.shape == (3, 2 * D_MODEL, D_STATE) and cache.ssm_state.dtype == torch.float32
    assert cache.seqlen == 0 and cache.batch_size == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 0}, "d_model"),
        ({"d_state": 2.5}, "d_state"),
        ({"dt_rank": 0}, "dt_rank"),
        ({"dt_init": "normal"}, "dt_init"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
        ({"backend": "gpu"}, "backend must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba(**{"d_model": D_MODEL, **kwargs})


def test_bad_forward_arguments():
    layer = make_mamba()
    h = hidden()
    with pytest.raises(ValueError, match="mask must have shape"):
        layer(h, mask=torch.ones(2, SEQLEN + 1, dtype=torch.bool))
    cache = layer.allocate_cache(2, SEQLEN)
    layer(h[:, :4], cache)
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, past \+ seqlen\) = \(2, 4 \+ 1\)"):
        layer(h[:, 4:5], cache, mask=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        layer(h, mask=[[1] * SEQLEN] * 2)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(h[..., :-1])
    with pytest.raises(ValueError, match="cache holds batch 2"):
        layer(h[:1, :1], cache)


def test_cache_reset_and_reorder():
    cache = MambaCache(torch.arange(6.0).view(3, 2, 1), torch.arange(12.0).view(3, 2, 2), seqlen=5)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.conv_state.flatten().tolist() == [4, 5, 4, 5, 0, 1]
    assert cache.ssm_state[:, 0, 0].tolist() == [8, 8, 0]
    with pytest.raises(ValueError, match="batch_index"):
        cache.reorder(torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="batch_index"):
        cache.reorder(torch.tensor([0.0, 1.0, 2.0]))
    cache.reset()
    assert cache.seqlen == 0 and not cache.conv_state.any() and not cache.ssm_state.any()
    for cls, shapes in ((Mamba2Cache, [(2, 3, 4), (2, 1, 2, 3)]), (AttentionCache, [(2, 7, 1, 4)] * 2)):
        other = cls(*(torch.ones(s) for s in shapes), seqlen=3)
        other.reset()
        assert other.seqlen == 0 and all(not t.any() for t in other.tensors())
    assert AttentionCache(torch.zeros(2, 7, 1, 4), torch.zeros(2, 7, 1, 4)).max_seqlen == 7
