"""The Triton norms (ops/norm/triton.py) against the reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: Triton
reads TRITON_INTERPRET when a kernel is decorated (when
``lnlm_ssm.ops.norm.triton`` is first imported, lazily, on the first call with
backend="triton"), so setting it at the top of this module is enough even if
triton itself was imported earlier. The cached backend probe is cleared by the
fixture below, as a probe during collection may predate the variable.

Outputs (y, y1, the new residual) and the gradients of every input (x, weight,
bias, residual, x1, weight1, bias1, rowscale, z; a gradient arriving through
every output) against the reference on the same inputs; bf16/fp16 also by the
flash-attention rule against float64. With dropout the reference is given the
masks the kernel returns.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from lnlm_ssm.ops import _backends, layer_norm_fn, layer_norm_ref, layernorm_fn, rms_norm_ref  # noqa: E402
from lnlm_ssm.ops.norm.reference import residual_dtype  # noqa: E402
from lnlm_ssm.utils.testing import assert_close, assert_close_to_ref  # noqa: E402

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
NORM = {"rms": True, "layer": False}


@pytest.fixture(autouse=True, scope="module")
def _triton_usable():
    _backends._probe.cache_clear()
    reason = _backends.backend_report()["triton"]
    if reason != "available":
        pytest.skip(reason)


def gen(shape, dtype):
    return torch.randn(*shape, dtype=f64).to(DEVICE, dtype)


def make_inputs(shape=(3, 5, 24), dtype=f32, *, bias=True, residual=True, x1=False, weight1=False, bias1=False,
                rowscale=False, z=False, param_dtype=f32, residual_dtype=None):
    hidden = shape[-1]
    scale = lambda: (1 + 0.1 * torch.randn(hidden, dtype=f64)).to(DEVICE, param_dtype)  # noqa: E731
    inputs = dict(
        x=gen(shape, dtype),
        weight=scale(),
        bias=gen((hidden,), param_dtype) if bias else None,
        residual=gen(shape, residual_dtype or dtype) if residual else None,
        x1=gen(shape, dtype) if x1 else None,
        weight1=scale() if weight1 else None,
        bias1=gen((hidden,), param_dtype) if bias1 else None,
        rowscale=(0.5 + torch.rand(shape[:-1], dtype=f64)).to(DEVICE, f32) if rowscale else None,
        z=gen(shape, dtype) if z else None,
    )
    return {k: v for k, v in inputs.items() if v is not None}


def call(leaves, backend, is_rms_norm, masks, options):
    """The public function, or, given dropout masks, the reference run with them."""
    args = {k: leaves.get(k) for k in ("x", "weight", "bias")}
    if "z" in leaves or "group_size" in options:
        return layernorm_fn(**args, z=leaves.get("z"), is_rms_norm=is_rms_norm, **options, backend=backend)
    extra = {k: leaves.get(k) for k in ("residual", "x1", "weight1", "bias1", "rowscale")}
    if masks is None:
        return layer_norm_fn(**args, **extra, is_rms_norm=is_rms_norm, **options, backend=backend)
    ref = rms_norm_ref if is_rms_norm else layer_norm_ref
    prenorm = options.get("prenorm", False)
    out = ref(**args, **extra, dropout_p=options["dropout_p"], prenorm=prenorm, dropout_mask=masks[0],
              dropout_mask1=masks[1], upcast=True)
    if not prenorm:
        return out
    # The reference returns the new residual in its compute dtype; the public function in the stream's.
    stream = residual_dtype(leaves["x"], leaves.get("residual"), options.get("residual_in_fp32", False))
    return out[:-1] + (out[-1].to(stream),)


def run(inputs, backend, is_rms_norm=True, cast=None, masks=None, **options):
    """Outputs, returned masks and the gradients of a fixed random loss on the outputs, for every input."""
    leaves = {
        k: (v if cast is None else v.to(cast)).detach().clone().requires_grad_(True)
        for k, v in inputs.items()
    }
    result = call(leaves, backend, is_rms_norm, masks, options)
    outs = result if isinstance(result, tuple) else (result,)
    returned_masks = None
    if options.get("return_dropout_mask"):
        outs, returned_masks = outs[:-2], outs[-2:]
    generator = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, generator=generator, dtype=f64).to(DEVICE, inputs["x"].dtype).to(o.dtype)
                 for o in outs]
    grads = torch.autograd.grad(outs, list(leaves.values()), grads_out)
    names = ["y"] + (["y1"] if "weight1" in inputs else []) + (["new_residual"] if options.get("prenorm") else [])
    assert len(names) == len(outs)
    return {**dict(zip(names, outs)), **{f"d{k}": g for k, g in zip(leaves, grads)}}, returned_masks


def check_against_reference(inputs, msg="", is_rms_norm=True, **options):
    got, masks = run(inputs, "triton", is_rms_norm, **options)
    ref_options = options
    if options.get("dropout_p", 0.0) > 0:
        assert masks is not None, "a dropout test must ask for the masks"
        ref_options = {k: v for k, v in options.items() if k != "return_dropout_mask"}
    else:
        masks = None
    expected, _ = run(inputs, "reference", is_rms_norm, masks=masks, **ref_options)
    assert got.keys() == expected.keys()
    dtype = inputs["x"].dtype
    low = dtype in (bf16, f16)
    high = run(inputs, "reference", is_rms_norm, cast=f64, masks=masks, **ref_options)[0] if low else None
    for name, value in got.items():
        assert value.dtype == expected[name].dtype and value.shape == expected[name].shape, f"{msg} {name}"
        assert_close(value, expected[name], dtype, msg=f"{msg} {name}")
        if low:
            assert_close_to_ref(value, high[name], expected[name], msg=f"{msg} {name} vs float64")
    return masks


@pytest.mark.parametrize("kind", NORM)
@pytest.mark.parametrize("dtype", [f32, bf16, f16], ids=str)
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_residual_add(kind, dtype, prenorm, residual_in_fp32):
    check_against_reference(make_inputs(dtype=dtype), is_rms_norm=NORM[kind], prenorm=prenorm,
                            residual_in_fp32=residual_in_fp32)


@pytest.mark.parametrize("kind", NORM)
@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
def test_gating_and_groups(kind, dtype, norm_before_gate, group_size):
    """Mamba-2's gated norm: z gating before or after, normalised per group."""
    inputs = make_inputs(dtype=dtype, residual=False, z=True, bias=group_size is None)
    check_against_reference(inputs, is_rms_norm=NORM[kind], norm_before_gate=norm_before_gate,
                            group_size=group_size)


@pytest.mark.parametrize("kind", NORM)
@pytest.mark.parametrize("parts", [("x1",), ("weight1",), ("weight1", "bias1"), ("x1", "weight1", "bias1")],
                         ids="+".join)
@pytest.mark.parametrize("prenorm", [False, True])
def test_x1_and_parallel_norm(kind, parts, prenorm):
    inputs = make_inputs(dtype=bf16, **{p: True for p in parts})
    check_against_reference(inputs, is_rms_norm=NORM[kind], prenorm=prenorm)


@pytest.mark.parametrize("kind", NORM)
@pytest.mark.parametrize("residual", [False, True])
def test_rowscale(kind, residual):
    """rowscale scales each row of x before the add; its gradient is computed too."""
    inputs = make_inputs(residual=residual, rowscale=True)
    check_against_reference(inputs, is_rms_norm=NORM[kind], prenorm=True)


@pytest.mark.parametrize("kind", NORM)
@pytest.mark.parametrize("parts", [(), ("x1",), ("x1", "weight1", "bias1"), ("rowscale",)], ids=str)
@pytest.mark.parametrize("prenorm", [False, True])
def test_dropout_matches_the_reference_with_the_returned_masks(kind, parts, prenorm):
    """The kernels' outputs and gradients are the reference's on the masks they return: the backward
    draws the same masks again."""
    inputs = make_inputs(dtype=bf16, **{p: True for p in parts})
    masks = check_against_reference(inputs, is_rms_norm=NORM[kind], dropout_p=0.3, prenorm=prenorm,
                                    return_dropout_mask=True)
    assert masks[0].dtype == torch.bool and masks[0].shape == inputs["x"].shape
    assert (masks[1] is None) == ("x1" not in inputs)


def test_dropout_masks():
    """Kept fraction 1 - p; x and x1 masks independent; the seed comes from torch's generator; the
    forward without the masks returned keeps the same ones."""
    p = 0.3
    x, x1, w = gen((96, 80), f32), gen((96, 80), f32), torch.ones(80, device=DEVICE)

    def draw(return_dropout_mask=True):
        return layer_norm_fn(x, w, None, None, x1, dropout_p=p, return_dropout_mask=return_dropout_mask,
                             backend="triton")

    torch.manual_seed(3)
    y, mask, mask1 = draw()
    for m in (mask, mask1):
        assert abs(m.double().mean().item() - (1 - p)) < 0.02
    assert abs((mask == mask1).double().mean().item() - (p * p + (1 - p) ** 2)) < 0.02
    # Neither a row nor a column pattern: rows differ from each other, and so do columns.
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[:, 0], mask[:, 1])
    torch.manual_seed(3)
    y_again = draw(return_dropout_mask=False)
    assert torch.equal(y_again, y)
    assert not torch.equal(draw()[1], mask)


def test_everything_at_once():
    inputs = make_inputs(dtype=f16, x1=True, weight1=True, bias1=True, param_dtype=f16, residual_dtype=f32)
    check_against_reference(inputs, is_rms_norm=False, dropout_p=0.2, prenorm=True, residual_in_fp32=True,
                            return_dropout_mask=True)
    inputs = make_inputs(dtype=f16, residual=False, z=True, param_dtype=f16)
    check_against_reference(inputs, group_size=6, norm_before_gate=False)


@pytest.mark.parametrize("kind", NORM)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (2, 33, 40), (200, 8)], ids=str)
def test_awkward_shapes(kind, shape):
    """One channel, hidden not a power of two, and more rows than the backward's programs take at once.

    LayerNorm of one channel is its bias whatever x, and the gradient through it, zero, comes out of the
    reference as rounding noise times 1/sqrt(eps): two channels stand in for one there.
    """
    if kind == "layer" and shape[-1] == 1:
        shape = shape[:-1] + (2,)
    check_against_reference(make_inputs(shape=shape), is_rms_norm=NORM[kind], prenorm=True)


def test_first_layer_prenorm_without_residual():
    inputs = make_inputs(dtype=bf16, residual=False)
    check_against_reference(inputs, prenorm=True)
    check_against_reference(inputs, prenorm=True, residual_in_fp32=True)


def test_noncontiguous_inputs():
    inputs = make_inputs(shape=(6, 16), x1=True, weight1=True)
    inputs["x"] = torch.randn(16, 6, device=DEVICE).t()
    inputs["residual"] = torch.randn(6, 32, device=DEVICE)[:, ::2]
    inputs["x1"] = torch.randn(6, 32, device=DEVICE)[:, 1::2]
    inputs["weight1"] = torch.randn(32, device=DEVICE)[::2]
    check_against_reference(inputs, prenorm=True)
    check_against_reference(inputs, is_rms_norm=False, prenorm=True)


def test_refuses_float64_and_huge_groups():
    with pytest.raises(TypeError, match="float64.*backend='reference'"):
        layer_norm_fn(torch.randn(2, 4, dtype=f64, device=DEVICE), torch.ones(4, dtype=f64, device=DEVICE), None,
                      backend="triton")
    hidden = 2 * 65536
    with pytest.raises(ValueError, match="rms_norm_fn: .*at most 65536 channels"):
        layer_norm_fn(torch.randn(1, hidden, device=DEVICE), torch.ones(hidden, device=DEVICE), None,
                      is_rms_norm=True, backend="triton")
    with pytest.raises(ValueError, match="layernorm_fn: .*at most 65536 channels.*smaller group_size"):
        layernorm_fn(torch.randn(1, hidden, device=DEVICE), torch.ones(hidden, device=DEVICE), None,
                     group_size=hidden, backend="triton")


def test_compiled_block_norm_is_one_graph():
    inputs = make_inputs(dtype=f32, bias=False)

    @torch.compile(fullgraph=True, dynamic=False)
    def block(x, weight, residual):
        y, new_residual = layer_norm_fn(x, weight, None, residual, prenorm=True, residual_in_fp32=True,
                                        is_rms_norm=True, backend="triton")
        return y * 2, new_residual

    expected = layer_norm_fn(inputs["x"], inputs["weight"], None, inputs["residual"], prenorm=True,
                             residual_in_fp32=True, is_rms_norm=True, backend="reference")
    y, new_residual = block(inputs["x"], inputs["weight"], inputs["residual"])
    assert_close(y, expected[0] * 2)
    assert_close(new_residual, expected[1])


def test_compiled_dropout_and_gated_norm():
    inputs = make_inputs(dtype=f32, x1=True, weight1=True)
    z = gen(inputs["x"].shape, f32)

    @torch.compile(fullgraph=True, dynamic=False)
    def fused(x, weight, bias, residual, x1, weight1):
        y, y1, new_residual, mask, mask1 = layer_norm_fn(x, weight, bias, residual, x1, weight1, dropout_p=0.25,
                                                         prenorm=True, return_dropout_mask=True, backend="triton")
        gated = layernorm_fn(y, weight, bias, z, group_size=8, norm_before_gate=False, backend="triton")
        return y, y1, new_residual, mask, mask1, gated

    y, y1, new_residual, mask, mask1, gated = fused(*(inputs[k] for k in ("x", "weight", "bias", "residual", "x1",
                                                                           "weight1")))
    expected = layer_norm_ref(inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"], inputs["x1"],
                              inputs["weight1"], None, dropout_p=0.25, prenorm=True, dropout_mask=mask,
                              dropout_mask1=mask1, upcast=True)
    for got, want in zip((y, y1, new_residual), expected):
        assert_close(got, want)
    assert_close(gated, layernorm_fn(y, inputs["weight"], inputs["bias"], z, group_size=8, norm_before_gate=False,
                                     backend="reference"))


@pytest.mark.skipif(not GPU, reason="real sizes need a CUDA GPU (the interpreter is too slow for them)")
@pytest.mark.parametrize("kind", NORM)
@pytest.mark.parametrize("hidden, group_size", [(2560, None), (8192, 1024), (5120, None)])
def test_real_sizes_on_gpu(kind, hidden, group_size):
    if group_size is None:
        inputs = make_inputs(shape=(4, 1024, hidden), dtype=bf16, x1=True, weight1=True)
        check_against_reference(inputs, is_rms_norm=NORM[kind], prenorm=True, residual_in_fp32=True,
                                dropout_p=0.1, return_dropout_mask=True)
    else:
        inputs = make_inputs(shape=(4, 1024, hidden), dtype=bf16, residual=False, z=True)
        check_against_reference(inputs, is_rms_norm=NORM[kind], group_size=group_size, norm_before_gate=False)
