"""The Triton causal conv1d (ops/conv1d/triton.py) against the reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: Triton
reads TRITON_INTERPRET when a kernel is decorated (when
``lnlm_ssm.ops.conv1d.triton`` is first imported, lazily, on the first call with
backend="triton"), so setting it at the top of this module is enough even if
triton itself was imported earlier. The cached backend probe is cleared by the
fixture below, as a probe during collection may predate the variable.

Outputs, final states and every gradient (x, weight, bias, initial states, with
a gradient arriving through the final states too) against the reference on the
same inputs; bf16/fp16 also by the flash-attention rule against float64.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from lnlm_ssm.ops import _backends, causal_conv1d_fn, causal_conv1d_update, causal_conv1d_update_ref  # noqa: E402
from lnlm_ssm.utils.testing import assert_close, assert_close_to_ref  # noqa: E402

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
NAMES = ("x", "weight", "bias", "initial_states")


@pytest.fixture(autouse=True, scope="module")
def _triton_usable():
    _backends._probe.cache_clear()
    reason = _backends.backend_report()["triton"]
    if reason != "available":
        pytest.skip(reason)


def make_inputs(batch=2, dim=5, seqlen=37, width=4, dtype=f32, param_dtype=None, bias=True, initial_states=True):
    param_dtype = param_dtype or dtype
    return dict(
        x=torch.randn(batch, dim, seqlen, dtype=f64).to(DEVICE, dtype),
        weight=(torch.randn(dim, width, dtype=f64) / width**0.5).to(DEVICE, param_dtype),
        bias=torch.randn(dim, dtype=f64).to(DEVICE, param_dtype) if bias else None,
        initial_states=(
            torch.randn(batch, dim, width - 1, dtype=f64).to(DEVICE, param_dtype) if initial_states else None
        ),
    )


def packed_seq_idx(batch, lengths, dtype=torch.int64):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids.expand(batch, -1).contiguous().to(DEVICE, dtype)


def run(inputs, backend, activation="silu", seq_idx=None, cast=None):
    """Output, final states and the gradients of a fixed random loss on both, for every input."""
    leaves = {
        k: (v if cast is None else v.to(cast)).detach().clone().requires_grad_(True)
        for k, v in inputs.items()
        if v is not None
    }
    out, final = causal_conv1d_fn(
        leaves["x"], leaves["weight"], leaves.get("bias"), seq_idx=seq_idx,
        initial_states=leaves.get("initial_states"), return_final_states=True, activation=activation,
        backend=backend,
    )
    gen = torch.Generator().manual_seed(1)
    dtype = inputs["x"].dtype
    grad_out = torch.randn(out.shape, generator=gen, dtype=f64).to(DEVICE, dtype).to(out.dtype)
    grad_final = torch.randn(final.shape, generator=gen, dtype=f64).to(DEVICE, dtype).to(final.dtype)
    grads = torch.autograd.grad((out, final), list(leaves.values()), (grad_out, grad_final))
    return {"out": out, "final_states": final, **{f"d{k}": g for k, g in zip(leaves, grads)}}


def check_against_reference(inputs, activation="silu", seq_idx=None, msg=""):
    got = run(inputs, "triton", activation, seq_idx)
    expected = run(inputs, "reference", activation, seq_idx)
    assert got.keys() == expected.keys()
    dtype = inputs["x"].dtype
    exact = dtype not in (bf16, f16) or None
    high = exact or run(inputs, "reference", activation, seq_idx, cast=f64)
    for name, value in got.items():
        assert value.dtype == expected[name].dtype and value.shape == expected[name].shape, f"{msg} {name}"
        assert_close(value, expected[name], dtype, msg=f"{msg} {name}")
        if not exact:
            assert_close_to_ref(value, high[name], expected[name], msg=f"{msg} {name} vs float64")


@pytest.mark.parametrize("dtype", [f32, bf16, f16], ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_reference(dtype, width, activation):
    check_against_reference(make_inputs(width=width, dtype=dtype), activation)


@pytest.mark.parametrize("width", [1, 5])
def test_other_widths(width):
    check_against_reference(make_inputs(width=width, seqlen=11))


@pytest.mark.parametrize("bias, initial_states", [(False, False), (True, False), (False, True)])
def test_without_optional_inputs(bias, initial_states):
    check_against_reference(make_inputs(bias=bias, initial_states=initial_states))


def test_low_precision_input_with_float32_parameters():
    check_against_reference(make_inputs(dtype=bf16, param_dtype=f32))


@pytest.mark.parametrize("seqlen", [1, 2, 64, 97])
def test_lengths(seqlen):
    """A single step, a row shorter than the history, one full block and one block and a bit (blocks are 64)."""
    check_against_reference(make_inputs(seqlen=seqlen, width=4, dim=3), msg=f"seqlen={seqlen}")


@pytest.mark.parametrize("layout", ["channel_last", "batch_inner"])
def test_strided_x_and_grad_out(layout):
    """x as Mamba-2 gives it, (b, l, d) transposed, and (d, b, l) permuted; grad_out likewise."""
    batch, dim, seqlen = 3, 6, 41
    inputs = make_inputs(batch, dim, seqlen)
    if layout == "channel_last":
        x = torch.randn(batch, seqlen, dim, device=DEVICE).transpose(1, 2)
        grad_out = torch.randn(batch, seqlen, dim, device=DEVICE).transpose(1, 2)
    else:
        x = torch.randn(dim, batch, seqlen, device=DEVICE).transpose(0, 1)
        grad_out = torch.randn(dim, batch, seqlen, device=DEVICE).transpose(0, 1)
    assert not x.is_contiguous() and not grad_out.is_contiguous()
    inputs["x"] = x
    results = []
    for backend in ("triton", "reference"):
        leaves = [v.clone().requires_grad_(True) for v in inputs.values()]
        out = causal_conv1d_fn(*leaves[:3], initial_states=leaves[3], activation="silu", backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for name, got, expected in zip(("out",) + NAMES, *results):
        assert_close(got, expected, msg=name)


def test_gradient_through_final_states_alone():
    inputs = make_inputs(seqlen=2)
    x = inputs["x"].clone().requires_grad_(True)
    initial = inputs["initial_states"].clone().requires_grad_(True)
    grads = []
    for backend in ("triton", "reference"):
        _, final = causal_conv1d_fn(x, inputs["weight"], initial_states=initial, return_final_states=True,
                                    backend=backend)
        grads.append(torch.autograd.grad(final.square().sum(), (x, initial)))
    for got, expected in zip(*grads):
        assert_close(got, expected)


@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
@pytest.mark.parametrize("lengths", [[3, 1, 6], [70, 1, 2, 21], [1] * 7])
def test_seq_idx_matches_reference(dtype, lengths):
    inputs = make_inputs(dim=4, seqlen=sum(lengths), dtype=dtype)
    check_against_reference(inputs, seq_idx=packed_seq_idx(2, lengths), msg=f"lengths={lengths}")


def test_seq_idx_int32_equals_separate_sequences():
    lengths = [5, 1, 2, 9]
    inputs = make_inputs(dim=4, seqlen=sum(lengths))
    packed = causal_conv1d_fn(**inputs, seq_idx=packed_seq_idx(2, lengths, torch.int32), activation="silu",
                              backend="triton")
    start = 0
    for i, n in enumerate(lengths):
        part = causal_conv1d_fn(
            inputs["x"][..., start : start + n], inputs["weight"], inputs["bias"],
            initial_states=inputs["initial_states"] if i == 0 else None, activation="silu", backend="reference",
        )
        assert_close(packed[..., start : start + n], part, msg=f"sequence {i}")
        start += n


def test_refuses_float64():
    with pytest.raises(TypeError, match="float64.*backend='reference' or 'cpu'"):
        causal_conv1d_fn(**make_inputs(dtype=f64), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        causal_conv1d_update(torch.randn(2, 5, dtype=f64), torch.randn(2, 5, 3, dtype=f64),
                             torch.randn(5, 4, dtype=f64), backend="triton")


# ---------------------------------------------------------------- the decode update


@pytest.mark.parametrize("dtype, state_dtype", [(f32, f32), (bf16, bf16), (f16, f32)], ids=str)
@pytest.mark.parametrize("steps", [None, 1, 3])
@pytest.mark.parametrize("state_len", [3, 6])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_update_matches_reference(dtype, state_dtype, steps, state_len, activation):
    batch, dim, width = 2, 5, 4
    x = torch.randn((batch, dim) if steps is None else (batch, dim, steps), device=DEVICE).to(dtype)
    state = torch.randn(batch, dim, state_len, device=DEVICE).to(state_dtype)
    weight, bias = torch.randn(dim, width, device=DEVICE), torch.randn(dim, device=DEVICE)
    s_tri, s_ref = state.clone(), state.clone()
    out = causal_conv1d_update(x, s_tri, weight, bias, activation, backend="triton")
    expected = causal_conv1d_update_ref(x, s_ref, weight, bias, activation)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, expected, dtype)
    assert torch.equal(s_tri, s_ref)  # a shift and a copy: exact


def test_update_strided_state_and_x():
    """conv_state as a (channel-last) view of a cache, x a non-contiguous step."""
    batch, dim, width = 3, 6, 4
    cache = torch.randn(2, batch, width - 1, dim, device=DEVICE)
    state = cache[1].transpose(1, 2)
    x = torch.randn(dim, batch, device=DEVICE).t()
    weight = torch.randn(dim, width, device=DEVICE)
    expected_state = state.clone()
    expected = causal_conv1d_update_ref(x, expected_state, weight, None, "silu")
    other = cache[0].clone()
    out = causal_conv1d_update(x, state, weight, None, "silu", backend="triton")
    assert_close(out, expected)
    assert torch.equal(cache[1].transpose(1, 2), expected_state) and torch.equal(cache[0], other)


def test_update_steps_equal_the_full_convolution():
    inputs = make_inputs(batch=2, dim=4, seqlen=9, initial_states=True)
    full = causal_conv1d_fn(**inputs, activation="silu", backend="reference")
    state = inputs["initial_states"].clone()
    outs = [
        causal_conv1d_update(inputs["x"][..., t], state, inputs["weight"], inputs["bias"], "silu", backend="triton")
        for t in range(9)
    ]
    assert_close(torch.stack(outs, -1), full)
    assert torch.equal(state, inputs["x"][..., -3:])


def test_update_gradients_match_reference():
    batch, dim, width = 2, 5, 4
    x = torch.randn(batch, dim, 2, device=DEVICE)
    state = torch.randn(batch, dim, 5, device=DEVICE)
    weight, bias = torch.randn(dim, width, device=DEVICE), torch.randn(dim, device=DEVICE)
    grad = torch.randn(batch, dim, 2, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        s = state.clone()
        out = causal_conv1d_update(leaves[0], s, leaves[1], leaves[2], "silu", backend=backend)
        results.append((out, s, *torch.autograd.grad(out, leaves, grad)))
    for name, got, expected in zip(("out", "state", "dx", "dweight", "dbias"), *results):
        assert_close(got, expected, msg=name)


# ---------------------------------------------------------------- causal-conv1d's padding, circular buffers, pools


@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
def test_seq_idx_padding_matches_reference(dtype):
    """Padding (-1, int32 as causal-conv1d takes it) at the start, inside a sequence and at the end: output
    and every gradient, across a 64-step block boundary."""
    runs = [[(-1, 2), (0, 30), (-1, 3), (0, 3), (1, 30), (-1, 2)], [(2, 1), (-1, 40), (3, 29)]]
    seq_idx = torch.tensor([[i for i, n in row for _ in range(n)] for row in runs], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(batch=2, dim=3, seqlen=70, dtype=dtype, initial_states=False)
    results = []
    for backend in ("triton", "reference"):
        leaves = [inputs[k].detach().clone().requires_grad_(True) for k in ("x", "weight", "bias")]
        out = causal_conv1d_fn(*leaves, seq_idx, activation="silu", backend=backend)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for name, got, expected in zip(("out", "dx", "dweight", "dbias"), *results):
        assert_close(got, expected, dtype, msg=name)
    assert results[0][0].masked_select((seq_idx < 0)[:, None, :]).eq(0).all()


@pytest.mark.parametrize("dtype, state_dtype", [(f32, f32), (bf16, f32)], ids=str)
@pytest.mark.parametrize("steps", [None, 3, 9])
@pytest.mark.parametrize("mode", ["circular", "pool", "circular_pool"])
def test_update_circular_and_pool_match_reference(dtype, state_dtype, steps, mode):
    """cache_seqlens (int32, past the buffer's length too) and conv_state_indices (int64, with padding);
    9 steps wrap the 6-slot circular buffer."""
    batch, dim, width, state_len = 4, 5, 4, 6
    x = torch.randn((batch, dim) if steps is None else (batch, dim, steps), device=DEVICE).to(dtype)
    weight, bias = torch.randn(dim, width, device=DEVICE), torch.randn(dim, device=DEVICE)
    cache_seqlens = torch.tensor([0, 5, 2, 1001], dtype=torch.int32, device=DEVICE) if "circular" in mode else None
    indices = torch.tensor([3, -1, 0, 5], device=DEVICE) if "pool" in mode else None
    state = torch.randn(6 if indices is not None else batch, dim, state_len, device=DEVICE).to(state_dtype)
    s_tri, s_ref = state.clone(), state.clone()
    out = causal_conv1d_update(x, s_tri, weight, bias, "silu", cache_seqlens, indices, backend="triton")
    expected = causal_conv1d_update(x, s_ref, weight, bias, "silu", cache_seqlens, indices, backend="reference")
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, expected, dtype)
    assert torch.equal(s_tri, s_ref)


@pytest.mark.parametrize("width, state_len", [(1, 0), (1, 2), (2, 1), (3, 2)])
def test_update_circular_pool_small_buffers(width, state_len):
    """Width 1 keeps no history and may keep no buffer at all; a one-slot buffer (which the GPU compiler
    specialises as a constant)."""
    x, weight = torch.randn(3, 4, 3, device=DEVICE), torch.randn(4, width, device=DEVICE)
    cache_seqlens, indices = torch.tensor([0, 5, 2], device=DEVICE), torch.tensor([1, -1, 0], device=DEVICE)
    state = torch.randn(2, 4, state_len, device=DEVICE)
    s_tri, s_ref = state.clone(), state.clone()
    out = causal_conv1d_update(x, s_tri, weight, None, "silu", cache_seqlens, indices, backend="triton")
    expected = causal_conv1d_update(x, s_ref, weight, None, "silu", cache_seqlens, indices, backend="reference")
    assert_close(out, expected)
    assert torch.equal(s_tri, s_ref)


def test_update_pool_through_a_strided_view_with_gradients():
    """The pool as one layer of a channel-last cache; gradients of x, weight and bias through a circular pool."""
    batch, dim, width, pool_size = 3, 5, 4, 4
    cache = torch.randn(2, pool_size, 6, dim, device=DEVICE)
    x = torch.randn(dim, batch, device=DEVICE).t()
    weight, bias = torch.randn(dim, width, device=DEVICE), torch.randn(dim, device=DEVICE)
    cache_seqlens, indices = torch.tensor([9, 0, 3], device=DEVICE), torch.tensor([2, 0, -1], device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        layer = cache.clone()
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        out = causal_conv1d_update(leaves[0], layer[1].transpose(1, 2), leaves[1], leaves[2], "silu", cache_seqlens,
                                   indices, backend=backend)
        results.append((out, layer, *torch.autograd.grad(out.square().sum(), leaves)))
    for name, got, expected in zip(("out", "cache", "dx", "dweight", "dbias"), *results):
        assert_close(got, expected, msg=name)


# ---------------------------------------------------------------- GPU only: real sizes


@pytest.mark.skipif(not GPU, reason="real sizes need a CUDA GPU (the interpreter is too slow for them)")
@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
def test_real_sizes_on_gpu(layout):
    batch, dim, seqlen = 2, 2048, 4096
    inputs = make_inputs(batch=batch, dim=dim, seqlen=seqlen, dtype=bf16, param_dtype=f32)
    if layout == "channel_last":
        inputs["x"] = inputs["x"].transpose(1, 2).contiguous().transpose(1, 2)
    check_against_reference(inputs, seq_idx=packed_seq_idx(batch, [1000, 3000, 96]))


@pytest.mark.parametrize("seqlen", [1, 37])
def test_backward_reads_nothing_before_initial_states(seqlen):
    """The backward once read up to width - 1 elements before initial_states (masked to 0 after, but
    0 * NaN is NaN): a flaky NaN in dweight. Here that memory holds NaN, so any such read shows."""
    batch, dim, width = 2, 5, 4
    inputs = make_inputs(batch, dim, seqlen, width)
    buf = torch.full((width + batch * dim * (width - 1),), float("nan"), device=DEVICE)
    buf[width:] = inputs["initial_states"].flatten()
    grads = []
    for backend, init in (("triton", buf[width:].view(batch, dim, width - 1)), ("reference", inputs["initial_states"])):
        leaves = [inputs["x"].clone().requires_grad_(True), inputs["weight"].clone().requires_grad_(True),
                  inputs["bias"].clone().requires_grad_(True), init.detach().requires_grad_(True)]
        out = causal_conv1d_fn(*leaves[:3], initial_states=leaves[3], activation="silu", backend=backend)
        grads.append(torch.autograd.grad(out.sum(), leaves))
    for name, got, expected in zip(("dx", "dweight", "dbias", "dinitial_states"), *grads):
        assert_close(got, expected, msg=name)
