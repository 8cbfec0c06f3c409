"""The C++ CPU causal conv1d (csrc/cpu/conv1d.cpp) against the reference.

Outputs, final states and every gradient (x, weight, bias, initial states, with
a gradient arriving through the final states too); float64/float32 within their
tight tolerance, bfloat16/float16 within theirs. The update step against the
reference update, and against the full convolution step by step.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lnlm_ssm.ops import (
    available_backends,
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from lnlm_ssm.utils.testing import assert_close

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="the C++ extension lnlm_ssm._C is not built")

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
NAMES = ("x", "weight", "bias", "initial_states")


def make_inputs(batch=2, dim=5, seqlen=37, width=4, dtype=f32, param_dtype=None, bias=True, initial_states=True):
    param_dtype = param_dtype or dtype
    return dict(
        x=torch.randn(batch, dim, seqlen, dtype=f64).to(dtype),
        weight=(torch.randn(dim, width, dtype=f64) / width**0.5).to(param_dtype),
        bias=torch.randn(dim, dtype=f64).to(param_dtype) if bias else None,
        initial_states=torch.randn(batch, dim, width - 1, dtype=f64).to(param_dtype) if initial_states else None,
    )


def packed_seq_idx(batch, lengths):
    """(batch, sum(lengths)) ids of consecutive sequences of the given lengths."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids.expand(batch, -1).contiguous()


def run(inputs, backend, activation="silu", seq_idx=None):
    """Output, final states and the gradients of a random loss on both, with respect to every input."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    out, final = causal_conv1d_fn(
        leaves["x"],
        leaves["weight"],
        leaves.get("bias"),
        seq_idx=seq_idx,
        initial_states=leaves.get("initial_states"),
        return_final_states=True,
        activation=activation,
        backend=backend,
    )
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=gen, dtype=f64).to(out.dtype)
    grad_final = torch.randn(final.shape, generator=gen, dtype=f64).to(final.dtype)
    grads = torch.autograd.grad((out, final), list(leaves.values()), (grad_out, grad_final))
    return {"out": out, "final_states": final, **{f"d{k}": g for k, g in zip(leaves, grads)}}


def check_against_reference(inputs, activation="silu", seq_idx=None, msg=""):
    got = run(inputs, "cpu", activation, seq_idx)
    expected = run(inputs, "reference", activation, seq_idx)
    assert got.keys() == expected.keys()
    dtype = inputs["x"].dtype
    for name, value in got.items():
        assert value.dtype == expected[name].dtype and value.shape == expected[name].shape, f"{msg} {name}"
        assert_close(value, expected[name], dtype, msg=f"{msg} {name}")


@pytest.mark.parametrize("dtype", [f64, f32, bf16, f16], ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_reference(dtype, width, activation):
    check_against_reference(make_inputs(width=width, dtype=dtype), activation)


@pytest.mark.parametrize("width", [1, 5])
def test_other_widths(width):
    check_against_reference(make_inputs(width=width, dtype=f64, seqlen=11))


@pytest.mark.parametrize("bias, initial_states", [(False, False), (True, False), (False, True)])
def test_without_optional_inputs(bias, initial_states):
    check_against_reference(make_inputs(dtype=f64, bias=bias, initial_states=initial_states))


def test_low_precision_input_with_float32_parameters():
    check_against_reference(make_inputs(dtype=bf16, param_dtype=f32))


@pytest.mark.parametrize("seqlen", [1, 2, 3, 97, 512, 1025])
@pytest.mark.parametrize("width", [3, 4])
def test_lengths(seqlen, width):
    """Single steps, rows shorter than the history, odd lengths and lengths around the kernel's 512-step blocks."""
    check_against_reference(make_inputs(seqlen=seqlen, width=width, dtype=f64), msg=f"seqlen={seqlen}")


def test_empty_sequence_returns_the_initial_states():
    inputs = make_inputs(seqlen=0)
    out, final = causal_conv1d_fn(**inputs, return_final_states=True, backend="cpu")
    assert out.shape == (2, 5, 0)
    assert torch.equal(final, inputs["initial_states"])


@pytest.mark.parametrize("dtype", [f32, bf16], ids=str)
@pytest.mark.parametrize("layout", ["channel_last", "batch_inner"])
def test_strided_x(dtype, layout):
    """x as Mamba-2 gives it, (b, l, d) transposed, and as Mamba-1 does, (d, b, l) permuted (time-contiguous rows)."""
    batch, dim, seqlen = 3, 6, 41
    if layout == "channel_last":
        x = torch.randn(batch, seqlen, dim).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(dim, batch, seqlen).to(dtype).transpose(0, 1)
    assert x.shape == (batch, dim, seqlen) and not x.is_contiguous()
    inputs = make_inputs(batch, dim, seqlen, dtype=dtype)
    inputs["x"] = x
    check_against_reference(inputs)


@pytest.mark.parametrize("layout", ["channel_last", "batch_inner"])
def test_strided_grad_out(layout):
    """The output's gradient as it comes back from a transposed use of the output."""
    inputs = make_inputs(batch=3, dim=6, seqlen=41, dtype=f64)
    if layout == "channel_last":
        grad_out = torch.randn(3, 41, 6, dtype=f64).transpose(1, 2)
    else:
        grad_out = torch.randn(6, 3, 41, dtype=f64).transpose(0, 1)
    grads = []
    for backend in ("cpu", "reference"):
        leaves = [v.clone().requires_grad_(True) for v in inputs.values()]
        out = causal_conv1d_fn(*leaves[:3], initial_states=leaves[3], activation="silu", backend=backend)
        grads.append(torch.autograd.grad(out, leaves, grad_out))
    for name, got, expected in zip(NAMES, *grads):
        assert_close(got, expected, msg=name)


def test_gradient_through_final_states_alone():
    inputs = make_inputs(dtype=f64, seqlen=2)
    x = inputs["x"].clone().requires_grad_(True)
    initial = inputs["initial_states"].clone().requires_grad_(True)
    grads = []
    for backend in ("cpu", "reference"):
        _, final = causal_conv1d_fn(x, inputs["weight"], initial_states=initial, return_final_states=True, backend=backend)
        grads.append(torch.autograd.grad(final.square().sum(), (x, initial)))
    for got, expected in zip(*grads):
        assert_close(got, expected)
    # The final states are (h2, x0, x1): only the last initial state reaches them.
    assert grads[0][1][..., :2].abs().sum() == 0 and grads[0][1][..., 2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [f64, bf16], ids=str)
@pytest.mark.parametrize("lengths", [[3, 1, 6], [600, 1, 2, 421], [1] * 7])
def test_seq_idx_matches_reference(dtype, lengths):
    inputs = make_inputs(dim=4, seqlen=sum(lengths), dtype=dtype)
    check_against_reference(inputs, seq_idx=packed_seq_idx(2, lengths), msg=f"lengths={lengths}")


def test_seq_idx_equals_separate_sequences():
    """Packed rows (int32 ids) == each sequence on its own; only the first one sees the initial states."""
    lengths = [5, 1, 2, 9]
    inputs = make_inputs(dim=4, seqlen=sum(lengths), dtype=f64)
    seq_idx = packed_seq_idx(2, lengths).to(torch.int32)
    packed = causal_conv1d_fn(**inputs, seq_idx=seq_idx, activation="silu", backend="cpu")
    start = 0
    for i, n in enumerate(lengths):
        part = causal_conv1d_fn(
            inputs["x"][..., start : start + n],
            inputs["weight"],
            inputs["bias"],
            initial_states=inputs["initial_states"] if i == 0 else None,
            activation="silu",
            backend="cpu",
        )
        assert_close(packed[..., start : start + n], part, msg=f"sequence {i}")
        start += n


def test_no_grad_forward():
    inputs = make_inputs(dtype=f32)
    with torch.no_grad():
        out = causal_conv1d_fn(**inputs, activation="silu", backend="cpu")
    assert_close(out, causal_conv1d_ref(**inputs, activation="silu"))


def test_one_and_two_threads_agree_exactly():
    """Each channel is computed by one thread in a fixed order, so the thread count cannot change a bit."""
    inputs = make_inputs(batch=2, dim=64, seqlen=1100, dtype=f32)
    seq_idx = packed_seq_idx(2, [700, 400])
    cache = torch.randn(2, 64, 5)
    steps = torch.randn(2, 64, 600)  # enough work per row for the update to split over threads
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            full = run(inputs, "cpu", seq_idx=seq_idx)
            state = cache.clone()
            full["update"] = causal_conv1d_update(steps, state, inputs["weight"], inputs["bias"], "silu", backend="cpu")
            full["state"] = state
            results.append(full)
    finally:
        torch.set_num_threads(threads)
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


# ---------------------------------------------------------------- the update (decode) step


def check_update(x, conv_state, weight, bias, activation="silu"):
    state_cpu, state_ref = conv_state.clone(), conv_state.clone()
    out = causal_conv1d_update(x, state_cpu, weight, bias, activation, backend="cpu")
    expected = causal_conv1d_update_ref(x, state_ref, weight, bias, activation)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, expected, x.dtype)
    assert torch.equal(state_cpu, state_ref)


@pytest.mark.parametrize(
    "dtype, state_dtype", [(f32, f32), (f64, f64), (bf16, bf16), (bf16, f32), (f16, f16), (f32, bf16)], ids=str
)
@pytest.mark.parametrize("seqlen", [None, 1, 3, 7])
@pytest.mark.parametrize("extra_state", [0, 2])
def test_update_matches_reference(dtype, state_dtype, seqlen, extra_state):
    """Single token (b, d) (seqlen None) and several tokens (b, d, l), with state_len = width - 1 + extra_state."""
    batch, dim, width = 3, 7, 4
    shape = (batch, dim) if seqlen is None else (batch, dim, seqlen)
    x = torch.randn(shape).to(dtype)
    weight = torch.randn(dim, width).to(dtype)
    conv_state = torch.randn(batch, dim, width - 1 + extra_state).to(state_dtype)
    check_update(x, conv_state, weight, torch.randn(dim).to(dtype))


@pytest.mark.parametrize("width", [1, 2, 3, 5])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_update_widths(width, activation):
    dim = 6
    check_update(torch.randn(2, dim, 2), torch.randn(2, dim, width + 1), torch.randn(dim, width), None, activation)


def test_update_writes_through_a_strided_state_view():
    """conv_state as one layer of a cache laid out (layer, batch, state_len, dim); x strided too."""
    batch, dim, width = 2, 5, 4
    cache = torch.randn(3, batch, width - 1, dim)
    others = cache[[0, 2]].clone()
    view = cache[1].transpose(1, 2)
    x = torch.randn(dim, batch).t()
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    expected_state = view.clone()
    expected = causal_conv1d_update_ref(x, expected_state, weight, bias, "silu")
    out = causal_conv1d_update(x, view, weight, bias, "silu", backend="cpu")
    assert_close(out, expected)
    assert torch.equal(cache[1].transpose(1, 2), expected_state)
    assert torch.equal(cache[[0, 2]], others)


def test_update_refuses_an_overlapping_state():
    conv_state = torch.randn(1, 4, 3).expand(2, 4, 3)
    with pytest.raises(RuntimeError, match="conv_state is updated in place"):
        causal_conv1d_update(torch.randn(2, 4), conv_state, torch.randn(4, 4), backend="cpu")


@pytest.mark.parametrize("tokens_per_step", [1, 3])
def test_update_steps_equal_the_full_convolution(tokens_per_step):
    width, seqlen = 4, 10
    inputs = make_inputs(dim=8, seqlen=seqlen, width=width, dtype=f32)
    x, weight, bias, initial = inputs["x"], inputs["weight"], inputs["bias"], inputs["initial_states"]
    full, final = causal_conv1d_fn(x, weight, bias, initial_states=initial, return_final_states=True, activation="silu", backend="cpu")
    conv_state = torch.cat([torch.randn(2, 8, 2), initial], dim=-1)
    outs = []
    for start in range(0, seqlen, tokens_per_step):
        chunk = x[..., start : start + tokens_per_step]
        if tokens_per_step == 1:
            chunk = chunk[..., 0]
        step = causal_conv1d_update(chunk, conv_state, weight, bias, "silu", backend="cpu")
        outs.append(step.unsqueeze(-1) if tokens_per_step == 1 else step)
    assert_close(torch.cat(outs, -1), full)
    assert torch.equal(conv_state[..., -(width - 1) :], final)


def test_update_gradients_match_reference():
    batch, dim, width = 2, 5, 4
    x, weight, bias = torch.randn(batch, dim, 3, dtype=f64), torch.randn(dim, width, dtype=f64), torch.randn(dim, dtype=f64)
    conv_state = torch.randn(batch, dim, width + 1, dtype=f64)
    results = []
    for update in (lambda *a: causal_conv1d_update(*a, backend="cpu"), causal_conv1d_update_ref):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        state = conv_state.clone()
        out = update(leaves[0], state, leaves[1], leaves[2], "silu")
        results.append([out, state, *torch.autograd.grad(out.square().sum(), leaves)])
    for got, expected in zip(*results):
        assert_close(got, expected)


# ---------------------------------------------------------------- causal-conv1d's padding, circular buffers, pools


def padded_seq_idx(batch, seqlen):
    """Packed rows with padding (-1) at the start, inside and at the end, ids counting on across rows."""
    gen = torch.Generator().manual_seed(3)
    rows, next_id = [], 0
    for _ in range(batch):
        row = []
        while len(row) < seqlen:
            n = int(torch.randint(1, 6, (), generator=gen))
            if torch.rand((), generator=gen) < 0.3:
                row += [-1] * n
            else:
                row += [next_id] * n
                next_id += 1
        rows.append(row[:seqlen])
    return torch.tensor(rows)


def grads_without_states(inputs, seq_idx, backend):
    leaves = {k: inputs[k].detach().clone().requires_grad_(True) for k in ("x", "weight", "bias")}
    out = causal_conv1d_fn(*leaves.values(), seq_idx, activation="silu", backend=backend)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=f64).to(out.dtype)
    return (out, *torch.autograd.grad(out, list(leaves.values()), grad))


@pytest.mark.parametrize("dtype", [f64, bf16], ids=str)
@pytest.mark.parametrize("seqlen", [9, 600])
def test_seq_idx_padding_matches_reference(dtype, seqlen):
    """Output and every gradient with padding (-1) in seq_idx, int32 as causal-conv1d takes it; across a
    512-step block boundary too."""
    inputs = make_inputs(batch=3, dim=4, seqlen=seqlen, dtype=dtype, initial_states=False)
    seq_idx = padded_seq_idx(3, seqlen).to(torch.int32)
    assert (seq_idx < 0).any() and (seq_idx >= 0).any()
    got, expected = grads_without_states(inputs, seq_idx, "cpu"), grads_without_states(inputs, seq_idx, "reference")
    for name, a, b in zip(("out", "dx", "dweight", "dbias"), got, expected):
        assert_close(a, b, dtype, msg=name)
    assert got[0].masked_select((seq_idx < 0)[:, None, :]).eq(0).all()


def check_indexed_update(x, conv_state, weight, bias, cache_seqlens, conv_state_indices, activation="silu"):
    state_cpu, state_ref = conv_state.clone(), conv_state.clone()
    args = (weight, bias, activation, cache_seqlens, conv_state_indices)
    out = causal_conv1d_update(x, state_cpu, *args, backend="cpu")
    expected = causal_conv1d_update(x, state_ref, *args, backend="reference")
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, expected, x.dtype)
    assert torch.equal(state_cpu, state_ref)


@pytest.mark.parametrize("dtype, state_dtype", [(f64, f64), (f32, f32), (bf16, bf16), (bf16, f32)], ids=str)
@pytest.mark.parametrize("seqlen", [None, 1, 3, 9])
@pytest.mark.parametrize("state_len", [3, 6])
@pytest.mark.parametrize("mode", ["circular", "pool", "circular_pool"])
def test_update_circular_and_pool_match_reference(dtype, state_dtype, seqlen, state_len, mode):
    """cache_seqlens (int32, past the buffer's length too) and conv_state_indices (int64, with padding);
    seqlen 9 > state_len wraps the circular buffer."""
    batch, dim, width = 4, 7, 4
    x = torch.randn((batch, dim) if seqlen is None else (batch, dim, seqlen)).to(dtype)
    weight, bias = torch.randn(dim, width).to(dtype), torch.randn(dim).to(dtype)
    cache_seqlens = torch.tensor([0, 5, 2, 1001], dtype=torch.int32) if "circular" in mode else None
    indices = torch.tensor([3, -1, 0, 5]) if "pool" in mode else None
    conv_state = torch.randn(6 if indices is not None else batch, dim, state_len).to(state_dtype)
    check_indexed_update(x, conv_state, weight, bias, cache_seqlens, indices)


@pytest.mark.parametrize("width", [1, 2, 5])
def test_update_circular_other_widths(width):
    """Width 1 reads no history and may keep an empty buffer (state_len 0); width 5 takes the kernel's generic path."""
    dim = 6
    for state_len in {width - 1, width + 2}:
        check_indexed_update(
            torch.randn(3, dim, 2), torch.randn(3, dim, state_len), torch.randn(dim, width), None,
            torch.tensor([4, 0, 7]), None,
        )


def test_update_pool_through_a_strided_view():
    """The pool as one layer of a channel-last cache, x strided too."""
    batch, dim, width, pool_size = 3, 5, 4, 4
    cache = torch.randn(2, pool_size, 6, dim)
    view = cache[1].transpose(1, 2)
    x = torch.randn(dim, batch).t()
    check_indexed_update(x, view, torch.randn(dim, width), torch.randn(dim), torch.tensor([9, 0, 3]), torch.tensor([2, 0, -1]))


@pytest.mark.parametrize("mode", ["circular", "pool"])
def test_update_indexed_gradients_match_reference(mode):
    batch, dim, width = 3, 5, 4
    x, weight, bias = torch.randn(batch, dim, 2, dtype=f64), torch.randn(dim, width, dtype=f64), torch.randn(dim, dtype=f64)
    cache_seqlens = torch.tensor([2, 0, 7]) if mode == "circular" else None
    indices = torch.tensor([1, -1, 3], dtype=torch.int32) if mode == "pool" else None
    conv_state = torch.randn(4 if indices is not None else batch, dim, width + 1, dtype=f64)
    results = []
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        state = conv_state.clone()
        out = causal_conv1d_update(leaves[0], state, leaves[1], leaves[2], "silu", cache_seqlens, indices, backend=backend)
        results.append([out, state, *torch.autograd.grad(out.square().sum(), leaves)])
    for name, got, expected in zip(("out", "state", "dx", "dweight", "dbias"), *results):
        assert_close(got, expected, msg=name)


def test_update_kernel_checks_its_indices():
    """The C++ op reads cache_seqlens and conv_state_indices itself, so it refuses values that would take it
    outside conv_state, whoever calls it."""
    x, state, weight = torch.randn(2, 3, 1), torch.randn(4, 3, 2), torch.randn(3, 3)
    op = torch.ops.lnlm_ssm.causal_conv1d_update
    with pytest.raises(RuntimeError, match=r"conv_state_indices must be < the pool size.*got 4 at index 1"):
        op(x, state, weight, None, False, None, torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match=r"cache_seqlens must be >= 0; got -1 at index 0"):
        op(x, state[:2], weight, None, False, torch.tensor([-1, 0], dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match=r"cache_seqlens must be int32 or int64 of shape \(2\)"):
        op(x, state[:2], weight, None, False, torch.tensor([0, 1, 2]), None)


# ---------------------------------------------------------------- properties


@given(
    batch=st.integers(1, 3),
    dim=st.integers(1, 6),
    seqlen=st.integers(1, 40),
    width=st.integers(1, 6),
    activation=st.sampled_from([None, "silu"]),
    optional=st.booleans(),
    packed=st.booleans(),
)
def test_property_float64_matches_reference(batch, dim, seqlen, width, activation, optional, packed):
    inputs = make_inputs(batch, dim, seqlen, width, dtype=f64, bias=optional, initial_states=optional)
    seq_idx = packed_seq_idx(batch, [seqlen // 3, seqlen - seqlen // 3]) if packed else None
    check_against_reference(inputs, activation, seq_idx)


@given(
    batch=st.integers(1, 4),
    seqlen=st.one_of(st.none(), st.integers(1, 9)),
    width=st.integers(1, 5),
    extra=st.integers(0, 4),
    circular=st.booleans(),
    pooled=st.booleans(),
    data=st.data(),
)
def test_property_update_matches_reference(batch, seqlen, width, extra, circular, pooled, data):
    dim = 3
    x = torch.randn((batch, dim) if seqlen is None else (batch, dim, seqlen), dtype=f64)
    cache_seqlens = torch.tensor(data.draw(st.lists(st.integers(0, 50), min_size=batch, max_size=batch))) if circular else None
    indices = None
    if pooled:
        slots = data.draw(st.permutations(range(batch + 2)))[:batch]
        indices = torch.tensor([s if s < batch else -1 for s in slots])
    conv_state = torch.randn(batch + 2 if pooled else batch, dim, width - 1 + extra, dtype=f64)
    check_indexed_update(x, conv_state, torch.randn(dim, width, dtype=f64), None, cache_seqlens, indices)


# ---------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph():
    inputs = make_inputs(dim=4, seqlen=16)

    cache_seqlens, indices = torch.tensor([5, 2]), torch.tensor([-1, 0], dtype=torch.int32)

    def f(x, weight, bias, initial_states, conv_state):
        out, final = causal_conv1d_fn(
            x, weight, bias, None, initial_states, return_final_states=True, activation="silu", backend="cpu"
        )
        with torch.no_grad():
            step = causal_conv1d_update(
                x[..., -1].detach(), conv_state, weight.detach(), bias.detach(), "silu", cache_seqlens, indices,
                backend="cpu",
            )
        return out.square().sum() + final.square().sum(), step

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, f):
        leaves = [v.clone().requires_grad_(True) for v in inputs.values()]
        conv_state = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2))
        loss, step = fn(*leaves, conv_state)
        results.append([loss.detach(), step, conv_state, *torch.autograd.grad(loss, leaves)])
    for got, expected in zip(*results):
        assert_close(got, expected)


def test_torch_compile_checks_index_values_without_reading_them():
    """Compiled, the value rules become assertions in the graph (no values read back while tracing)."""

    def step(x, conv_state, weight, cache_seqlens, indices):
        return causal_conv1d_update(x, conv_state, weight, None, None, cache_seqlens, indices, backend="cpu")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, pool, weight = torch.randn(2, 3), torch.randn(3, 3, 2), torch.randn(3, 3)
    expected_pool = pool.clone()
    expected = causal_conv1d_update(x, expected_pool, weight, None, None, torch.tensor([1, 2]), torch.tensor([0, 2]))
    assert_close(compiled(x, pool, weight, torch.tensor([1, 2]), torch.tensor([0, 2])), expected)
    assert torch.equal(pool, expected_pool)
    with pytest.raises(RuntimeError, match="conv_state_indices must not repeat a slot"):
        compiled(x, pool, weight, torch.tensor([1, 2]), torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="cache_seqlens must be >= 0"):
        compiled(x, pool, weight, torch.tensor([-1, 2]), torch.tensor([0, 1]))


def test_torch_compile_with_padded_seq_idx():
    def conv(x, weight, seq_idx):
        return causal_conv1d_fn(x, weight, None, seq_idx, activation="silu", backend="cpu")

    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    x, weight = torch.randn(1, 3, 5), torch.randn(3, 4)
    seq_idx = torch.tensor([[0, 0, -1, 1, 1]], dtype=torch.int32)
    assert_close(compiled(x, weight, seq_idx), conv(x, weight, seq_idx))
    with pytest.raises(RuntimeError, match="seq_idx must be non-decreasing along seqlen apart from padding"):
        compiled(x, weight, torch.tensor([[1, 0, -1, 1, 1]], dtype=torch.int32))
