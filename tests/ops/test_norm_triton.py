"""The Triton RMSNorm (ops/norm/triton.py) against the reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: Triton
reads TRITON_INTERPRET when a kernel is decorated (when
``lnlm_ssm.ops.norm.triton`` is first imported, lazily, on the first call with
backend="triton"), so setting it at the top of this module is enough even if
triton itself was imported earlier. The cached backend probe is cleared by the
fixture below, as a probe during collection may predate the variable.

Outputs, the new residual and the gradients of every input (a gradient arriving
through the new residual too) against the reference on the same inputs;
bf16/fp16 also by the flash-attention rule against float64.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from lnlm_ssm.ops import _backends, rms_norm_fn  # noqa: E402
from lnlm_ssm.utils.testing import assert_close, assert_close_to_ref  # noqa: E402

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _triton_usable():
    _backends._probe.cache_clear()
    reason = _backends.backend_report()["triton"]
    if reason != "available":
        pytest.skip(reason)


def make_inputs(shape=(3, 5, 24), dtype=f32, *, bias=True, residual=True, z=False, param_dtype=f32,
                residual_dtype=None):
    hidden = shape[-1]
    gen = lambda s, d: torch.randn(*s, dtype=f64).to(DEVICE, d)  # noqa: E731
    return dict(
        x=gen(shape, dtype),
        weight=(1 + 0.1 * torch.randn(hidden, dtype=f64)).to(DEVICE, param_dtype),
        bias=gen((hidden,), param_dtype) if bias else None,
        residual=gen(shape, residual_dtype or dtype) if residual else None,
        z=gen(shape, dtype) if z else None,
    )


def run(inputs, backend, cast=None, **options):
    """Outputs and the gradients of a fixed random loss on them, for every input."""
    leaves = {
        k: (v if cast is None else v.to(cast)).detach().clone().requires_grad_(True)
        for k, v in inputs.items()
        if v is not None
    }
    kwargs = {k: v for k, v in leaves.items() if k not in ("x", "weight", "bias")}
    result = rms_norm_fn(leaves["x"], leaves["weight"], leaves.get("bias"), **kwargs, **options, backend=backend)
    outs = result if isinstance(result, tuple) else (result,)
    gen = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, generator=gen, dtype=f64).to(DEVICE, inputs["x"].dtype).to(o.dtype)
                 for o in outs]
    grads = torch.autograd.grad(outs, list(leaves.values()), grads_out)
    named = {"y": outs[0], **({"new_residual": outs[1]} if len(outs) > 1 else {})}
    return {**named, **{f"d{k}": g for k, g in zip(leaves, grads)}}


def check_against_reference(inputs, msg="", **options):
    got = run(inputs, "triton", **options)
    expected = run(inputs, "reference", **options)
    assert got.keys() == expected.keys()
    dtype = inputs["x"].dtype
    low = dtype in (bf16, f16)
    high = run(inputs, "reference", cast=f64, **options) if low else None
    for name, value in got.items():
        assert value.dtype == expected[name].dtype and value.shape == expected[name].shape, f"{msg} {name}"
        assert_close(value, expected[name], dtype, msg=f"{msg} {name}")
        if low:
            assert_close_to_ref(value, high[name], expected[name], msg=f"{msg} {name} vs float64")


@pytest.mark.parametrize("dtype", [f32, bf16, f16], ids=str)
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_residual_add(dtype, prenorm, residual_in_fp32):
    check_against_reference(make_inputs(dtype=dtype), prenorm=prenorm, residual_in_fp32=residual_in_fp32)


@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
def test_gating_and_groups(dtype, norm_before_gate, group_size):
    """Mamba-2's gated norm: z gating before or after, normalised per group."""
    inputs = make_inputs(dtype=dtype, residual=False, z=True, bias=group_size is None)
    check_against_reference(inputs, norm_before_gate=norm_before_gate, group_size=group_size)


def test_everything_at_once():
    inputs = make_inputs(dtype=f16, z=True, param_dtype=f16, residual_dtype=f32)
    check_against_reference(inputs, group_size=6, norm_before_gate=False, prenorm=True, residual_in_fp32=True)


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (2, 33, 40), (200, 8)], ids=str)
def test_awkward_shapes(shape):
    """One channel, hidden not a power of two, and more rows than the backward's programs take at once."""
    check_against_reference(make_inputs(shape=shape), prenorm=True)


def test_first_layer_prenorm_without_residual():
    inputs = make_inputs(dtype=bf16, residual=False)
    check_against_reference(inputs, prenorm=True)
    check_against_reference(inputs, prenorm=True, residual_in_fp32=True)


def test_noncontiguous_inputs():
    inputs = make_inputs(shape=(6, 16))
    inputs["x"] = torch.randn(16, 6, device=DEVICE).t()
    inputs["residual"] = torch.randn(6, 32, device=DEVICE)[:, ::2]
    check_against_reference(inputs, prenorm=True)


def test_refuses_float64_and_huge_groups():
    with pytest.raises(TypeError, match="float64.*backend='reference'"):
        rms_norm_fn(torch.randn(2, 4, dtype=f64, device=DEVICE), torch.ones(4, dtype=f64, device=DEVICE),
                    backend="triton")
    hidden = 2 * 65536
    with pytest.raises(ValueError, match="at most 65536 channels"):
        rms_norm_fn(torch.randn(1, hidden, device=DEVICE), torch.ones(hidden, device=DEVICE), backend="triton")


def test_compiled_block_norm_is_one_graph():
    inputs = make_inputs(dtype=f32, bias=False)

    @torch.compile(fullgraph=True, dynamic=False)
    def block(x, weight, residual):
        y, new_residual = rms_norm_fn(x, weight, residual=residual, prenorm=True, residual_in_fp32=True,
                                      backend="triton")
        return y * 2, new_residual

    expected = rms_norm_fn(inputs["x"], inputs["weight"], residual=inputs["residual"], prenorm=True,
                           residual_in_fp32=True, backend="reference")
    y, new_residual = block(inputs["x"], inputs["weight"], inputs["residual"])
    assert_close(y, expected[0] * 2)
    assert_close(new_residual, expected[1])


@pytest.mark.skipif(not GPU, reason="real sizes need a CUDA GPU (the interpreter is too slow for them)")
@pytest.mark.parametrize("hidden, group_size", [(2560, None), (8192, 1024), (5120, None)])
def test_real_sizes_on_gpu(hidden, group_size):
    inputs = make_inputs(shape=(4, 1024, hidden), dtype=bf16, z=group_size is not None)
    check_against_reference(inputs, prenorm=True, residual_in_fp32=True, group_size=group_size)
