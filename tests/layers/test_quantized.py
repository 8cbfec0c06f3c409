"""quantize_: which modules it replaces, the error bound of every quantised projection, ties, and its refusals."""

import pytest
import torch
from torch import nn

import lnlm_ssm
from lnlm_ssm.layers import Mamba, QuantizedEmbedding, QuantizedLinear, TokenEmbedding, quantize_
from lnlm_ssm.layers.quantized import compute_dtype, dense_weight, project
from lnlm_ssm.models import MambaLM, MambaLMConfig
from lnlm_ssm.ops import dequantize_weight
from lnlm_ssm.utils.testing import assert_close

MODES = ["int8", "bf16"]
ATTN_CFG = {"num_heads": 4, "rotary_emb_dim": 8}
MAMBA2_CFG = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}
CONFIGS = {
    "mamba1": dict(ssm_cfg={"d_state": 8}),
    "mamba2": dict(ssm_cfg=MAMBA2_CFG),
    "attention": dict(layer_pattern="A", attn_cfg=ATTN_CFG, d_intermediate=48),
    "hybrid": dict(layer_pattern="MA", ssm_cfg=MAMBA2_CFG, attn_cfg=ATTN_CFG),
}
KINDS = sorted(CONFIGS)


def tiny(kind, backend="auto", **overrides):
    torch.manual_seed(0)
    fields = dict(d_model=32, n_layer=2, vocab_size=250, **CONFIGS[kind])
    fields.update(overrides)
    return MambaLM(MambaLMConfig(**fields), backend=backend).eval()


def weight_error_bound(module, float_weight):
    """Per-weight bound of |W - W'|: scale / 2 (int8, half a step of the row's grid) or 2^-8 |W| (bf16)."""
    if module.weight_scale is not None:
        return (module.weight_scale.double() / 2)[:, None].expand_as(float_weight)
    return float_weight.double().abs() * 2**-8


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_projection_and_the_embedding_are_replaced(kind, mode):
    model = tiny(kind)
    floats = {name: p.detach().clone() for name, p in model.named_parameters()}
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert quantize_(model, mode) is model and model.quantization == mode
    assert not any(isinstance(m, (nn.Linear, TokenEmbedding)) for m in model.modules())
    assert {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)} == linears
    names = {name.rsplit(".", 1)[-1] for name in linears}
    expected = {"in_proj", "out_proj", "lm_head"}
    expected |= {"x_proj", "dt_proj"} if kind == "mamba1" else set()
    expected |= {"fc1", "fc2"} if kind == "attention" else set()
    assert names == expected
    assert isinstance(model.backbone.embedding, QuantizedEmbedding)
    # The tie survives: one stored matrix (and one set of scales) for the lookup and the head.
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert model.lm_head.weight_scale is model.backbone.embedding.weight_scale
    stored = torch.int8 if mode == "int8" else torch.bfloat16
    for name, p in model.named_parameters():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in names | {"embedding"}:
            assert p.dtype == stored and not p.requires_grad, name
        elif name.endswith(".weight_scale"):
            assert mode == "int8" and p.dtype == torch.float32 and not p.requires_grad, name
        else:  # norms, conv, A_log, D, biases: untouched
            assert p.dtype == torch.float32 and p.requires_grad and torch.equal(p, floats[name]), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_each_projection_errs_within_its_bound(kind, mode):
    # Per weight: |W - W'| <= scale / 2 (int8) or 2^-8 |W| (bf16). Per output of x @ W'^T, then:
    # |y - y'| <= sum_k |x_k| * that bound (+ fp32 rounding). Checked on every projection of the model.
    model = tiny(kind, d_model=64)
    floats = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_(model, mode)
    gen = torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        weight = floats[name]
        per_weight = weight_error_bound(module, weight)
        deq = dequantize_weight(module.weight, module.weight_scale).double()
        assert bool(((deq - weight.double()).abs() <= per_weight).all()), name
        for rows in (1, 5, 40):  # the kernel's rows and the reference's
            x = torch.randn(rows, module.in_features, generator=gen)
            exact = x.double() @ weight.double().T
            got = project(module, x, bias=False).double()
            bound = x.double().abs() @ per_weight.T
            assert bool(((got - exact).abs() <= bound + 1e-5 * (1 + exact.abs())).all()), (name, rows)


@pytest.mark.parametrize("mode", MODES)
def test_embedding_rows_are_the_dequantised_table(mode):
    model = tiny("mamba1")
    table = model.backbone.embedding.weight.detach().clone()
    quantize_(model, mode)
    embedding = model.backbone.embedding
    ids = torch.tensor([[0, 3, 249], [7, 7, 1]])
    rows = embedding(ids)
    assert rows.dtype == torch.float32
    assert torch.equal(rows, dequantize_weight(embedding.weight, embedding.weight_scale)[ids])
    assert bool(((rows - table[ids]).abs() <= weight_error_bound(embedding, table)[ids]).all())
    with pytest.raises(ValueError, match="vocab_size=250"):
        embedding(torch.tensor([[250]]))


@pytest.mark.parametrize("mode", MODES)
def test_untied_head_is_quantised_on_its_own(mode):
    model = quantize_(tiny("mamba1", tie_embeddings=False), mode)
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert isinstance(model.lm_head, QuantizedLinear) and isinstance(model.backbone.embedding, QuantizedEmbedding)


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_decode_steps_match_the_prefill_path(kind, mode):
    # The decode steps take the kernel (one row per step), the full forward the reference (dequantise,
    # then F.linear): the same quantised model, so the same logits to fp32 rounding.
    model = quantize_(tiny(kind), mode)
    ids = torch.randint(0, 250, (2, 14), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits
    cache = model.allocate_cache(2, 14)
    assert all(t.dtype == torch.float32 for t in cache.tensors())
    logits = [model(ids[:, :9], cache=cache).logits]
    logits += [model(ids[:, t : t + 1], cache=cache).logits for t in range(9, 14)]
    assert_close(torch.cat(logits, dim=1), full)


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_kernels_match_the_reference_backend_in_a_model(mode):
    model = quantize_(tiny("mamba1", backend="cpu", d_model=128), mode)
    reference = quantize_(tiny("mamba1", backend="reference", d_model=128), mode)
    prompt = torch.randint(0, 250, (1, 5), generator=torch.Generator().manual_seed(3))
    cache, ref_cache = model.allocate_cache(1, 8), reference.allocate_cache(1, 8)
    model(prompt, cache=cache)
    reference(prompt, cache=ref_cache)
    step = prompt[:, -1:]
    assert_close(model(step, cache=cache).logits, reference(step, cache=ref_cache).logits)


@pytest.mark.parametrize("mode", MODES)
def test_quantised_logits_stay_near_the_float_model(mode):
    model = tiny("hybrid", d_model=64)
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids).logits
        after = quantize_(model, mode)(ids).logits
    # A sanity check, not the bound (that is per projection, above): int8 moves these logits ~1%, bf16 ~0.3%.
    relative = ((after - before).norm() / before.norm()).item()
    assert 0 < relative < (0.05 if mode == "int8" else 0.02)


def test_backward_through_a_quantised_model_is_refused():
    model = quantize_(tiny("hybrid").train(), "int8")
    ids = torch.randint(0, 250, (2, 8))
    loss = model(ids, labels=ids).loss  # the forward works (evaluation in grad mode)
    assert torch.isfinite(loss)
    with pytest.raises(RuntimeError, match="weight_only_linear has no backward.*quantize_"):
        loss.backward()


def test_errors():
    with pytest.raises(ValueError, match=r"mode must be one of \('int8', 'bf16'\), got 'int4'"):
        quantize_(tiny("mamba1"), "int4")
    model = quantize_(tiny("mamba1"), "int8")
    with pytest.raises(ValueError, match=r"quantised already \(int8\)"):
        quantize_(model, "bf16")
    # Quantised by hand, without the model's record: still found.
    layer = Mamba(32, d_state=8)
    layer.in_proj = QuantizedLinear(torch.zeros(128, 32, dtype=torch.bfloat16), None, None)
    with pytest.raises(ValueError, match=r"quantised already \(bf16\)"):
        quantize_(layer, "int8")
    with pytest.raises(TypeError, match="float32 model.*bfloat16"):
        quantize_(tiny("mamba1").to(torch.bfloat16), "int8")
    with pytest.raises(TypeError, match="hold the layers"):
        quantize_(nn.Linear(4, 4), "int8")
    with pytest.raises(TypeError, match="nn.Module"):
        quantize_("model", "int8")


@pytest.mark.parametrize("mode", MODES)
def test_a_layer_alone_and_the_package_root(mode):
    assert lnlm_ssm.quantize_ is quantize_
    torch.manual_seed(5)
    layer = Mamba(64, d_state=8).eval()
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        before = layer(x)
        quantize_(layer, mode)
        after = layer(x)
    assert isinstance(layer.x_proj, QuantizedLinear) and layer.quantization == mode
    assert after.shape == before.shape and compute_dtype(layer.out_proj) == torch.float32
    assert dense_weight(layer.dt_proj).dtype == torch.float32
    assert layer.allocate_cache(1, 4).conv_state.dtype == torch.float32
