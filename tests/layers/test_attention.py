"""Attention against a written-out softmax(QK^T)V with explicit masks and RoPE; cache, padding, errors."""

import math

import pytest
import torch

from lnlm_ssm.layers.attention import Attention, apply_rotary, rotary_cos_sin
from lnlm_ssm.layers.cache import AttentionCache
from lnlm_ssm.utils.testing import assert_close

f64 = torch.float64


def rope_naive(x, positions, rotary_dim, base, interleaved):
    """Rotate channel pairs of x (batch, seqlen, heads, head_dim) one pair at a time by position * base^(-2j/rotary_dim)."""
    out = x.clone()
    for j in range(rotary_dim // 2):
        angle = positions.to(f64) * base ** (-2.0 * j / rotary_dim)
        c, s = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
        a, b = (2 * j, 2 * j + 1) if interleaved else (j, j + rotary_dim // 2)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., a] * s + x[..., b] * c
    return out


def naive_attention(layer, x, positions=None, key_mask=None):
    """Per-head softmax(q k^T * scale) v with the visibility rules spelled out; padded queries give NaN rows."""
    batch, seqlen, _ = x.shape
    h, hkv, d = layer.num_heads, layer.num_heads_kv, layer.head_dim
    qkv = x @ layer.in_proj.weight.T
    if layer.in_proj.bias is not None:
        qkv = qkv + layer.in_proj.bias
    q = qkv[..., : h * d].reshape(batch, seqlen, h, d)
    k = qkv[..., h * d : (h + hkv) * d].reshape(batch, seqlen, hkv, d)
    v = qkv[..., (h + hkv) * d :].reshape(batch, seqlen, hkv, d)
    if positions is None:
        positions = torch.arange(seqlen).expand(batch, seqlen)
    if layer.rotary_emb_dim:
        q = rope_naive(q, positions, layer.rotary_emb_dim, layer.rotary_emb_base, layer.rotary_emb_interleaved)
        k = rope_naive(k, positions, layer.rotary_emb_dim, layer.rotary_emb_base, layer.rotary_emb_interleaved)

    t = torch.arange(seqlen)[:, None]
    s = torch.arange(seqlen)[None, :]
    visible = torch.ones(batch, seqlen, seqlen, dtype=torch.bool)
    if layer.causal:
        visible &= s <= t
    if layer.sliding_window is not None:
        visible &= s > t - layer.sliding_window
    if key_mask is not None:
        visible &= key_mask[:, None, :]

    out = torch.empty(batch, seqlen, h, d, dtype=x.dtype)
    for head in range(h):
        kv_head = head // (h // hkv)
        scores = q[:, :, head] @ k[:, :, kv_head].transpose(1, 2) * layer.softmax_scale
        scores = scores.masked_fill(~visible, -math.inf)
        out[:, :, head] = torch.softmax(scores, dim=-1) @ v[:, :, kv_head]
    return out.reshape(batch, seqlen, h * d) @ layer.out_proj.weight.T + layer.out_proj.bias


def make(num_heads=4, num_heads_kv=None, **kwargs):
    kwargs.setdefault("head_dim", 6)
    return Attention(12, num_heads, num_heads_kv, dtype=f64, **kwargs)


@pytest.mark.parametrize("num_heads_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize(
    "rotary", [dict(), dict(rotary_emb_dim=4), dict(rotary_emb_dim=6, rotary_emb_base=100.0), dict(rotary_emb_dim=6, rotary_emb_interleaved=True)],
    ids=["norope", "partial", "full", "interleaved"],
)
@pytest.mark.parametrize("sliding_window", [None, 3])
def test_matches_naive(num_heads_kv, rotary, sliding_window):
    layer = make(num_heads_kv=num_heads_kv, sliding_window=sliding_window, **rotary)
    x = torch.randn(2, 9, 12, dtype=f64)
    assert_close(layer(x), naive_attention(layer, x))


@pytest.mark.parametrize("kwargs", [dict(causal=False), dict(softmax_scale=0.3), dict(head_dim=None, rotary_emb_dim=2)])
def test_options_match_naive(kwargs):
    layer = make(num_heads_kv=2, **kwargs)
    x = torch.randn(2, 7, 12, dtype=f64)
    assert_close(layer(x), naive_attention(layer, x))


def test_position_ids_shift_rope():
    layer = make(num_heads_kv=2, rotary_emb_dim=6)
    x = torch.randn(2, 5, 12, dtype=f64)
    positions = torch.tensor([[7, 8, 9, 10, 11], [0, 2, 4, 6, 8]])
    assert_close(layer(x, position_ids=positions), naive_attention(layer, x, positions))


@pytest.mark.parametrize("sliding_window", [None, 4])
@pytest.mark.parametrize("num_heads_kv", [4, 1])
def test_decode_steps_equal_full_forward(num_heads_kv, sliding_window):
    layer = make(num_heads_kv=num_heads_kv, rotary_emb_dim=4, sliding_window=sliding_window)
    x = torch.randn(2, 8, 12, dtype=f64)
    full = layer(x)
    cache = layer.allocate_cache(2, 10)
    steps = [layer(x[:, i : i + 1], cache) for i in range(8)]
    assert cache.seqlen == 8
    assert_close(torch.cat(steps, dim=1), full)


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_chunked_prefill_equals_full_forward(sliding_window):
    layer = make(num_heads_kv=2, rotary_emb_dim=6, sliding_window=sliding_window)
    x = torch.randn(2, 10, 12, dtype=f64)
    full = layer(x)
    cache = layer.allocate_cache(2, 10)
    outs, start = [], 0
    for size in (3, 1, 4, 2):
        outs.append(layer(x[:, start : start + size], cache))
        start += size
    assert_close(torch.cat(outs, dim=1), full)


def test_cache_reset_starts_over():
    layer = make()
    x = torch.randn(1, 4, 12, dtype=f64)
    cache = layer.allocate_cache(1, 4)
    first = layer(x, cache)
    cache.reset()
    assert_close(layer(x, cache), first)


def test_cache_in_another_dtype():
    layer = make(num_heads_kv=2, rotary_emb_dim=4)
    x = torch.randn(1, 5, 12, dtype=f64)
    cache = layer.allocate_cache(1, 5, dtype=torch.float32)
    assert cache.k.dtype == torch.float32 and cache.k.shape == (1, 5, 2, 6)
    steps = torch.cat([layer(x[:, i : i + 1], cache) for i in range(5)], dim=1)
    assert steps.dtype == f64
    assert_close(steps, layer(x), dtype=torch.float32)


def left_padded(x_rows, lengths, total):
    """Stack rows of different lengths, padded on the left with noise, and their mask."""
    batch = len(x_rows)
    x = torch.randn(batch, total, x_rows[0].shape[-1], dtype=x_rows[0].dtype)
    mask = torch.zeros(batch, total, dtype=torch.bool)
    for i, (row, n) in enumerate(zip(x_rows, lengths)):
        x[i, total - n :] = row[:n]
        mask[i, total - n :] = True
    return x, mask


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_left_padding_equals_unpadded_row(sliding_window):
    layer = make(num_heads_kv=2, rotary_emb_dim=6, sliding_window=sliding_window)
    rows = [torch.randn(1, 4, 12, dtype=f64)[0], torch.randn(1, 7, 12, dtype=f64)[0]]
    x, mask = left_padded(rows, [4, 7], 7)
    x.requires_grad_(True)
    positions = mask.long().cumsum(-1) - 1
    out = layer(x, mask=mask, position_ids=positions)

    assert not out.isnan().any()
    assert_close(out[0, 3:], layer(rows[0][None])[0])
    assert_close(out[1], layer(rows[1][None])[0])
    assert_close(out[0, 3:], naive_attention(layer, x.detach(), positions, mask)[0, 3:])

    # Real outputs do not depend on padded inputs at all.
    (grad_from_real,) = torch.autograd.grad(out[0, 3:].sum() + out[1].sum(), x, retain_graph=True)
    assert not grad_from_real[0, :3].any()
    assert grad_from_real[0, 3:].abs().sum() > 0

    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_padded_keys_do_not_change_real_outputs():
    layer = make(num_heads_kv=1, rotary_emb_dim=4)
    x = torch.randn(1, 6, 12, dtype=f64)
    mask = torch.tensor([[False, False, True, True, True, True]])
    positions = mask.long().cumsum(-1) - 1
    out = layer(x, mask=mask, position_ids=positions)
    x_other_padding = x.clone()
    x_other_padding[:, :2] = 100 * torch.randn(1, 2, 12, dtype=f64)
    assert_close(layer(x_other_padding, mask=mask, position_ids=positions)[:, 2:], out[:, 2:])


def test_padded_query_sees_itself():
    # A padded query may see no real key; it attends to itself so that no torch version gives NaN there.
    layer = make(num_heads_kv=2)
    x = torch.randn(1, 4, 12, dtype=f64)
    out = layer(x, mask=torch.tensor([[False, False, True, True]]))
    v = (x[:, :2] @ layer.in_proj.weight.T + layer.in_proj.bias)[..., -2 * 6 :].unflatten(-1, (2, 6))
    own_value = v.repeat_interleave(2, dim=2).flatten(-2)
    assert_close(out[:, :2], layer.out_proj(own_value))


def test_padded_prefill_then_decode_equals_unpadded():
    layer = make(num_heads_kv=2, rotary_emb_dim=6)
    short, long = torch.randn(1, 6, 12, dtype=f64), torch.randn(1, 8, 12, dtype=f64)
    prompt, mask = left_padded([short[0, :3], long[0, :5]], [3, 5], 5)
    cache = layer.allocate_cache(2, 8)
    outs = [layer(prompt, cache, mask=mask, position_ids=mask.long().cumsum(-1) - 1)]
    positions = mask.long().sum(-1, keepdim=True)
    for i in range(3):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
        step = torch.stack([short[0, 3 + i], long[0, 5 + i]])[:, None]
        outs.append(layer(step, cache, mask=mask, position_ids=positions + i))
    out = torch.cat(outs, dim=1)
    assert not out.isnan().any()
    assert_close(out[0, 2:], layer(short)[0])
    assert_close(out[1], layer(long)[0])


def test_rope_matches_hf_llama():
    llama = pytest.importorskip(
        "transformers.models.llama.modeling_llama", reason="transformers is not installed; HF RoPE comparison skipped"
    )
    from transformers import LlamaConfig

    head_dim, base = 8, 500.0
    config = LlamaConfig(hidden_size=24, num_attention_heads=3, head_dim=head_dim, rope_theta=base)
    positions = torch.tensor([[0, 1, 2, 3, 4], [3, 5, 8, 13, 40]])
    q, k = torch.randn(2, 5, 3, head_dim), torch.randn(2, 5, 1, head_dim)
    hf_cos, hf_sin = llama.LlamaRotaryEmbedding(config)(q, positions)
    hf_q, hf_k = llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)

    cos, sin = rotary_cos_sin(positions, head_dim, base, torch.float32)
    assert_close(apply_rotary(q, cos, sin), hf_q.transpose(1, 2))
    assert_close(apply_rotary(k, cos, sin), hf_k.transpose(1, 2))


def test_state_dict_keys_and_shapes():
    layer = Attention(16, 4, 2, rotary_emb_dim=4)
    shapes = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    assert shapes == {
        "in_proj.weight": ((4 + 2 * 2) * 4, 16),
        "in_proj.bias": ((4 + 2 * 2) * 4,),
        "out_proj.weight": (16, 16),
        "out_proj.bias": (16,),
    }
    no_bias = Attention(16, 4, qkv_proj_bias=False, out_proj_bias=False)
    assert list(no_bias.state_dict()) == ["in_proj.weight", "out_proj.weight"]


def test_allocate_cache():
    layer = Attention(16, 4, 2, head_dim=3)
    cache = layer.allocate_cache(3, 7)
    assert isinstance(cache, AttentionCache) and cache.seqlen == 0
    assert cache.k.shape == cache.v.shape == (3, 7, 2, 3)
    assert cache.k.dtype == torch.float32 and not cache.k.any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_heads=4, num_heads_kv=3), "num_heads .* divisible by num_heads_kv"),
        (dict(num_heads=4, d_conv=4), "d_conv must be 0"),
        (dict(num_heads=5), "d_model .* divisible by num_heads"),
        (dict(num_heads=4, rotary_emb_dim=3), "rotary_emb_dim"),
        (dict(num_heads=4, rotary_emb_dim=8), "rotary_emb_dim"),
        (dict(num_heads=4, sliding_window=0), "sliding_window"),
        (dict(num_heads=4, sliding_window=2, causal=False), "sliding_window .* causal"),
        (dict(num_heads=4, backend="gpu"), "backend"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attention(16, **kwargs)


def test_cache_overflow():
    layer = make()
    cache = layer.allocate_cache(1, 5)
    layer(torch.randn(1, 4, 12, dtype=f64), cache)
    with pytest.raises(ValueError, match="cache overflow.*max_seqlen=5"):
        layer(torch.randn(1, 2, 12, dtype=f64), cache)
    assert cache.seqlen == 4


def test_bad_cache():
    layer = make(num_heads_kv=2)
    with pytest.raises(ValueError, match="cache.k and cache.v must have shape"):
        layer(torch.randn(2, 1, 12, dtype=f64), layer.allocate_cache(3, 4))
    with pytest.raises(ValueError, match="num_heads_kv=2"):
        layer(torch.randn(1, 1, 12, dtype=f64), make(num_heads_kv=4).allocate_cache(1, 4))
    with pytest.raises(TypeError, match="AttentionCache"):
        layer(torch.randn(1, 1, 12, dtype=f64), object())


def test_bad_mask_and_inputs():
    layer = make()
    x = torch.randn(2, 3, 12, dtype=f64)
    with pytest.raises(ValueError, match=r"mask must have shape \(batch=2, past \+ seqlen=3\), got \(2, 4\)"):
        layer(x, mask=torch.ones(2, 4, dtype=torch.bool))
    cache = layer.allocate_cache(2, 8)
    layer(x, cache)
    with pytest.raises(ValueError, match=r"past \+ seqlen=4"):
        layer(x[:, :1], cache, mask=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool or integer tensor"):
        layer(x, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"position_ids must have shape \(batch=2, seqlen=3\)"):
        layer(x, position_ids=torch.arange(3))
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        layer(x, position_ids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"hidden_states must have shape \(batch, seqlen, d_model=12\)"):
        layer(torch.randn(2, 3, 10, dtype=f64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn runs on a CUDA GPU only")
@pytest.mark.parametrize("num_heads_kv,sliding_window", [(4, None), (2, None), (1, 5)])
def test_flash_attn_path_matches_sdpa(num_heads_kv, sliding_window):
    """Full sequence, then a chunk after a cached past, then one decode step: flash-attn == SDPA."""
    from lnlm_ssm.layers.attention import flash_attn_func

    if flash_attn_func() is None:
        pytest.skip("flash-attn >= 2.3 is not installed")
    torch.manual_seed(0)
    kw = dict(num_heads=4, num_heads_kv=num_heads_kv, rotary_emb_dim=16, sliding_window=sliding_window)
    flash = Attention(64, **kw, device="cuda", dtype=torch.bfloat16)
    sdpa = Attention(64, **kw, use_flash_attn=False, device="cuda", dtype=torch.bfloat16)
    sdpa.load_state_dict(flash.state_dict())
    x = torch.randn(2, 24, 64, device="cuda", dtype=torch.bfloat16)
    assert_close(flash(x), sdpa(x))
    caches = [m.allocate_cache(2, 32) for m in (flash, sdpa)]
    for chunk in (x[:, :10], x[:, 10:23], x[:, 23:]):
        assert_close(flash(chunk, caches[0]), sdpa(chunk, caches[1]))
