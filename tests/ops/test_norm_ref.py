"""The norms' reference semantics: each argument against the written-out formula, mamba_ssm's signatures,
positional order and return structure."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from lnlm_ssm.ops import (
    layer_norm_fn,
    layer_norm_gated_ref,
    layer_norm_ref,
    layernorm_fn,
    rms_norm_fn,
    rms_norm_gated_ref,
    rms_norm_ref,
    rmsnorm_fn,
)
from lnlm_ssm.utils.testing import assert_close

f64, bf16 = torch.float64, torch.bfloat16
NORMS = {"rms": (rms_norm_fn, rms_norm_ref), "layer": (layer_norm_fn, layer_norm_ref)}


def rms_formula(h, eps=1e-6):
    return h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)


def layer_formula(h, eps=1e-6):
    centred = h - h.mean(-1, keepdim=True)
    return centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + eps)


FORMULAS = {"rms": rms_formula, "layer": layer_formula}


def randn(*shape, dtype=f64):
    return torch.randn(*shape, dtype=f64).to(dtype)


# mamba_ssm's parameter lists (ops/triton/layer_norm.py and layernorm_gated.py), names and defaults;
# ours add only the keyword-only backend.
INCUMBENT = {
    layer_norm_fn: "x weight bias residual=None x1=None weight1=None bias1=None eps=1e-06 dropout_p=0.0 rowscale=None "
    "prenorm=False residual_in_fp32=False is_rms_norm=False return_dropout_mask=False",
    rms_norm_fn: "x weight bias residual=None x1=None weight1=None bias1=None eps=1e-06 dropout_p=0.0 rowscale=None "
    "prenorm=False residual_in_fp32=False return_dropout_mask=False",
    layer_norm_ref: "x weight bias residual=None x1=None weight1=None bias1=None eps=1e-06 dropout_p=0.0 "
    "rowscale=None prenorm=False dropout_mask=None dropout_mask1=None upcast=False",
    rms_norm_ref: "x weight bias residual=None x1=None weight1=None bias1=None eps=1e-06 dropout_p=0.0 "
    "rowscale=None prenorm=False dropout_mask=None dropout_mask1=None upcast=False",
    layernorm_fn: "x weight bias z=None eps=1e-06 group_size=None norm_before_gate=True is_rms_norm=False",
    rmsnorm_fn: "x weight bias z=None eps=1e-06 group_size=None norm_before_gate=True",
    rms_norm_gated_ref: "x weight bias z=None eps=1e-06 group_size=None norm_before_gate=True upcast=True",
    layer_norm_gated_ref: "x weight bias z=None eps=1e-06 group_size=None norm_before_gate=True upcast=True",
}


@pytest.mark.parametrize("fn", INCUMBENT, ids=lambda fn: fn.__name__)
def test_signatures_are_the_incumbents(fn):
    params = list(inspect.signature(fn).parameters.values())
    if fn.__name__.endswith("_fn"):
        *params, backend = params
        assert backend.name == "backend" and backend.kind is inspect.Parameter.KEYWORD_ONLY
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    described = " ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in params)
    assert described == INCUMBENT[fn]


@pytest.mark.parametrize("kind", NORMS)
def test_plain_and_bias(kind):
    fn, ref = NORMS[kind]
    x, w, b = randn(3, 5, 8), randn(8), randn(8)
    assert_close(fn(x, w, None, eps=1e-5), FORMULAS[kind](x, 1e-5) * w)
    assert_close(fn(x, w, b), FORMULAS[kind](x) * w + b)
    assert_close(ref(x, w, b), FORMULAS[kind](x) * w + b)


def test_layer_norm_fn_is_rms_norm():
    x, w, b = randn(4, 8), randn(8), randn(8)
    assert torch.equal(layer_norm_fn(x, w, b, is_rms_norm=True), rms_norm_fn(x, w, b))
    assert not torch.allclose(layer_norm_fn(x, w, b), rms_norm_fn(x, w, b))


@pytest.mark.parametrize("kind", NORMS)
def test_residual_and_prenorm(kind):
    fn, ref = NORMS[kind]
    x, res, w, b = randn(4, 8), randn(4, 8), randn(8), randn(8)
    y, new_res = fn(x, w, b, residual=res, prenorm=True)
    assert_close(new_res, x + res)
    assert_close(y, FORMULAS[kind](x + res) * w + b)
    assert_close(fn(x, w, b, res), y)
    y_ref, new_res_ref = ref(x, w, b, res, prenorm=True)
    assert_close(y_ref, y)
    assert_close(new_res_ref, x + res)


def test_residual_dtype():
    """As mamba_ssm: the residual's dtype when there is one; without one, fp32 (or wider) with
    residual_in_fp32, else x's."""
    x, w = randn(4, 8, dtype=bf16), torch.randn(8)
    _, new_res = rms_norm_fn(x, w, None, residual=randn(4, 8, dtype=bf16), prenorm=True, residual_in_fp32=True)
    assert new_res.dtype == bf16
    _, new_res = rms_norm_fn(x, w, None, residual=torch.randn(4, 8), prenorm=True)
    assert new_res.dtype == torch.float32
    _, first = rms_norm_fn(x, w, None, prenorm=True)
    assert first.dtype == bf16 and torch.equal(first, x)
    _, first = layer_norm_fn(x, w, torch.zeros(8), prenorm=True, residual_in_fp32=True)
    assert first.dtype == torch.float32 and torch.equal(first, x.float())
    # "at least fp32": a float64 stream keeps its precision.
    _, first64 = rms_norm_fn(randn(4, 8), w.double(), None, prenorm=True, residual_in_fp32=True)
    assert first64.dtype == f64


@pytest.mark.parametrize("kind", NORMS)
def test_x1_and_the_parallel_norm(kind):
    """x1 is added to x before the norm; weight1/bias1 give a second output from the same normalised sum."""
    fn, ref = NORMS[kind]
    x, x1, res, w, b, w1, b1 = randn(2, 3, 8), randn(2, 3, 8), randn(2, 3, 8), randn(8), randn(8), randn(8), randn(8)
    normed = FORMULAS[kind](x + x1 + res)
    y, y1, new_res = fn(x, w, b, res, x1, w1, b1, prenorm=True)
    assert_close(y, normed * w + b)
    assert_close(y1, normed * w1 + b1)
    assert_close(new_res, x + x1 + res)
    for got, expected in zip(ref(x, w, b, res, x1, w1, b1, prenorm=True), (y, y1, new_res)):
        assert_close(got, expected)
    # Each on its own: x1 without a second output, a second output without x1, weight1 without bias1.
    assert_close(fn(x, w, b, x1=x1), FORMULAS[kind](x + x1) * w + b)
    y, y1 = fn(x, w, b, weight1=w1)
    assert_close(y1, FORMULAS[kind](x) * w1)
    assert_close(y, FORMULAS[kind](x) * w + b)


@pytest.mark.parametrize("kind", NORMS)
@pytest.mark.parametrize("flat", [False, True])
def test_rowscale(kind, flat):
    fn, ref = NORMS[kind]
    x, res, w = randn(2, 3, 8), randn(2, 3, 8), randn(8)
    rowscale = torch.rand(2, 3, dtype=f64)
    y, new_res = fn(x, w, None, res, rowscale=rowscale.flatten() if flat else rowscale, prenorm=True)
    assert_close(new_res, x * rowscale[..., None] + res)
    assert_close(y, FORMULAS[kind](new_res) * w)
    assert_close(ref(x, w, None, res, rowscale=rowscale, prenorm=True)[0], y)


@pytest.mark.parametrize("kind", NORMS)
def test_dropout_with_given_masks(kind):
    """Dropout zeroes x and x1 where their masks are False and scales the rest by 1 / (1 - p); never the residual."""
    _, ref = NORMS[kind]
    p = 0.25
    x, x1, res, w = randn(4, 16), randn(4, 16), randn(4, 16), randn(16)
    mask, mask1 = torch.rand(4, 16) > p, torch.rand(4, 16) > p
    y, new_res = ref(x, w, None, res, x1, dropout_p=p, prenorm=True, dropout_mask=mask, dropout_mask1=mask1)
    expected_res = x * mask / (1 - p) + x1 * mask1 / (1 - p) + res
    assert_close(new_res, expected_res)
    assert_close(y, FORMULAS[kind](expected_res) * w)
    # A mask means nothing without dropout.
    assert_close(ref(x, w, None, dropout_mask=mask), FORMULAS[kind](x) * w)


@pytest.mark.parametrize("kind", NORMS)
def test_dropout_reference_backend_returns_its_masks(kind):
    fn, ref = NORMS[kind]
    p = 0.3
    x, x1, res, w, w1 = randn(64, 32), randn(64, 32), randn(64, 32), randn(32), randn(32)
    y, y1, new_res, mask, mask1 = fn(x, w, None, res, x1, w1, None, dropout_p=p, prenorm=True,
                                     return_dropout_mask=True, backend="reference")
    assert mask.dtype == mask1.dtype == torch.bool and mask.shape == mask1.shape == x.shape
    assert abs(mask.double().mean().item() - (1 - p)) < 0.03 and abs(mask1.double().mean().item() - (1 - p)) < 0.03
    assert not torch.equal(mask, mask1)
    expected = ref(x, w, None, res, x1, w1, None, dropout_p=p, prenorm=True, dropout_mask=mask, dropout_mask1=mask1)
    for got, want in zip((y, y1, new_res), expected):
        assert_close(got, want)


@pytest.mark.parametrize("weight1", [False, True])
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("return_dropout_mask", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_return_structure(weight1, prenorm, return_dropout_mask, dropout_p):
    """y, then y1, then the new residual, then (mask, mask1); masks are None without dropout, mask1 without x1."""
    x, w, w1 = randn(3, 8), randn(8), randn(8)
    out = rms_norm_fn(x, w, None, weight1=w1 if weight1 else None, dropout_p=dropout_p, prenorm=prenorm,
                      return_dropout_mask=return_dropout_mask)
    expected_len = 1 + weight1 + prenorm + 2 * return_dropout_mask
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == expected_len and (expected_len > 1) == isinstance(out, tuple)
    if return_dropout_mask:
        assert outs[-1] is None
        assert (outs[-2] is None) == (dropout_p == 0.0)
    keep = outs[-2] if return_dropout_mask and dropout_p > 0 else None
    h = x if dropout_p == 0 else None if keep is None else x * keep / (1 - dropout_p)
    if prenorm:
        if h is not None:
            assert_close(outs[1 + weight1], h)
        h = outs[1 + weight1]
    if h is not None:  # else dropout drew a mask nothing returned
        assert_close(outs[0], rms_formula(h) * w)
        if weight1:
            assert_close(outs[1], rms_formula(h) * w1)


def test_positional_calls_in_the_incumbents_order():
    x, x1, res, z = randn(2, 8), randn(2, 8), randn(2, 8), randn(2, 8)
    w, b, w1, b1 = randn(8), randn(8), randn(8), randn(8)
    for kind, (fn, ref) in NORMS.items():
        normed = FORMULAS[kind](x + x1 + res, 1e-3)
        if kind == "rms":
            y, y1, new_res = fn(x, w, b, res, x1, w1, b1, 1e-3, 0.0, None, True, True, False)
        else:
            y, y1, new_res = fn(x, w, b, res, x1, w1, b1, 1e-3, 0.0, None, True, True, False, False)
        assert_close(y, normed * w + b)
        assert_close(y1, normed * w1 + b1)
        assert_close(new_res, x + x1 + res)
        y_ref, y1_ref, _ = ref(x, w, b, res, x1, w1, b1, 1e-3, 0.0, None, True, None, None, True)
        assert_close(y_ref, y)
        assert_close(y1_ref, y1)
    gated = rms_formula((x * F.silu(z)).view(2, 2, 4), 1e-3).view(2, 8) * w + b
    assert_close(rmsnorm_fn(x, w, b, z, 1e-3, 4, False), gated)
    assert_close(layernorm_fn(x, w, b, z, 1e-3, 4, False, True), gated)
    assert_close(rms_norm_gated_ref(x, w, b, z, 1e-3, 4, False, True), gated)


@pytest.mark.parametrize("kind", NORMS)
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 4])
def test_gating_and_groups(kind, norm_before_gate, group_size):
    x, z, w, b = randn(2, 8), randn(2, 8), randn(8), randn(8)
    g = 8 if group_size is None else group_size
    h = x if norm_before_gate else x * F.silu(z)
    expected = FORMULAS[kind](h.view(2, -1, g)).view(2, 8) * w + b
    if norm_before_gate:
        expected = expected * F.silu(z)
    fn = rmsnorm_fn if kind == "rms" else layernorm_fn
    ref = rms_norm_gated_ref if kind == "rms" else layer_norm_gated_ref
    assert_close(fn(x, w, b, z=z, group_size=group_size, norm_before_gate=norm_before_gate), expected)
    assert_close(ref(x, w, b, z=z, group_size=group_size, norm_before_gate=norm_before_gate), expected)
    assert_close(layernorm_fn(x, w, b, z, group_size=group_size, norm_before_gate=norm_before_gate,
                              is_rms_norm=kind == "rms"), expected)
    # Without z: the plain norm, per group.
    assert_close(fn(x, w, None, group_size=group_size), FORMULAS[kind](x.view(2, -1, g)).view(2, 8) * w)


def test_upcast():
    """upcast computes in fp32; without it every step runs in x's dtype (the low-precision reference)."""
    x, res, w = randn(4, 64, dtype=bf16), randn(4, 64, dtype=bf16), torch.randn(64)
    exact = rms_formula(x.double() + res.double()) * w.double()
    y_up, h_up = rms_norm_ref(x, w, None, res, prenorm=True, upcast=True)
    y_low, h_low = rms_norm_ref(x, w, None, res, prenorm=True)
    assert h_up.dtype == torch.float32 and h_low.dtype == bf16 and y_up.dtype == y_low.dtype == bf16
    assert torch.equal(h_low, x + res)
    assert_close(y_up, exact.to(bf16), bf16)
    z = randn(4, 64, dtype=bf16)
    assert rms_norm_gated_ref(x, w, None, z).dtype == bf16
    assert torch.equal(rms_norm_gated_ref(x, w, None, z, upcast=False),
                       (F.rms_norm(x, (64,), w.to(bf16), 1e-6) * F.silu(z)))


def test_gradcheck_add_norm():
    t = {k: torch.randn(2, 6, dtype=f64, requires_grad=True) for k in ("x", "residual", "x1")}
    p = {k: torch.randn(6, dtype=f64, requires_grad=True) for k in ("weight", "bias", "weight1", "bias1")}
    mask, mask1 = torch.rand(2, 6) > 0.2, torch.rand(2, 6) > 0.2
    rowscale = torch.rand(2, dtype=f64, requires_grad=True)

    def parallel(x, residual, x1, weight, bias, weight1, bias1):
        return layer_norm_ref(x, weight, bias, residual, x1, weight1, bias1, dropout_p=0.2, prenorm=True,
                              dropout_mask=mask, dropout_mask1=mask1)

    def scaled(x, residual, rowscale, weight):
        return rms_norm_ref(x, weight, None, residual, rowscale=rowscale, dropout_p=0.2, prenorm=True,
                            dropout_mask=mask)

    assert torch.autograd.gradcheck(parallel, (*t.values(), *p.values()))
    assert torch.autograd.gradcheck(scaled, (t["x"], t["residual"], rowscale, p["weight"]))


def test_gradcheck_gated():
    x, z = (torch.randn(2, 6, dtype=f64, requires_grad=True) for _ in range(2))
    w, b = torch.randn(6, dtype=f64, requires_grad=True), torch.randn(6, dtype=f64, requires_grad=True)
    for fn in (rmsnorm_fn, layernorm_fn):
        assert torch.autograd.gradcheck(lambda *a: fn(*a, group_size=3, norm_before_gate=False), (x, w, b, z))
