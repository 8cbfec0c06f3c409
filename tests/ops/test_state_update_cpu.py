"""The C++ CPU decode step (csrc/cpu/state_update.cpp) against the reference.

Expected values come from the reference on the same inputs: fp32/fp64 within
the tight tolerance of their dtype, bf16/fp16 within theirs, and for those also
the flash-attention rule against the reference run in float64.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lnlm_ssm.ops import selective_state_update, selective_state_update_ref
from lnlm_ssm.ops.state_update.cpu import selective_state_update_cpu
from lnlm_ssm.ops.state_update.shapes import canonicalize
from lnlm_ssm.utils.testing import assert_close
import state_update_cases as cases
from state_update_cases import make_inputs

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
# (input dtype, state dtype): the state is float32 or the input dtype.
DTYPES = [(f32, f32), (f64, f64), (f64, f32), (bf16, f32), (bf16, bf16), (f16, f32), (f16, f16)]


def check_against_reference(args, dt_softplus=True, msg=""):
    return cases.check_against_reference(args, "cpu", dt_softplus, msg)


@pytest.mark.parametrize("dtype, state_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_matches_reference(layout, dtype, state_dtype):
    args = make_inputs(layout, dtype, state_dtype)
    check_against_reference(args)


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dstate", [1, 5, 37, 128])
@pytest.mark.parametrize("dt_softplus", [False, True])
def test_shapes_and_options(layout, dstate, dt_softplus):
    args = make_inputs(layout, f32, f32, dstate=dstate, ngroups=1, per_head=dstate % 2 == 1)
    check_against_reference(args, dt_softplus=dt_softplus, msg=f"dstate={dstate}")


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_without_optional_inputs(layout):
    args = make_inputs(layout, f32, f32, optional=False)
    check_against_reference(args)


@pytest.mark.parametrize("dtype, state_dtype", [(f32, f32), (bf16, f32), (f16, f16)], ids=str)
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_noncontiguous_inputs(layout, dtype, state_dtype):
    args = make_inputs(layout, dtype, state_dtype, noncontiguous=True, per_head=False)
    y, _ = check_against_reference(args)
    assert y.is_contiguous()


@pytest.mark.parametrize("ngroups", [1, 2, 4])
def test_groups(ngroups):
    args = make_inputs("mamba2", f32, f32, nheads=8, ngroups=ngroups)
    check_against_reference(args)


def test_stride_zero_inputs():
    """Every input that can be is a broadcast view; only the state owns its memory."""
    batch, nheads, headdim, dstate, ngroups = 3, 4, 5, 6, 2
    state = torch.randn(batch, nheads, headdim, dstate)
    x = torch.randn(batch, nheads, 1).expand(batch, nheads, headdim)
    z = torch.randn(1, nheads, headdim).expand(batch, nheads, headdim)
    dt = torch.rand(batch, 1, 1).expand(batch, nheads, headdim)
    A = -torch.rand(nheads, 1, dstate).expand(nheads, headdim, dstate)
    B = torch.randn(1, ngroups, dstate).expand(batch, ngroups, dstate)
    C = torch.randn(batch, ngroups, 1).expand(batch, ngroups, dstate)
    D = torch.randn(1, headdim).expand(nheads, headdim)
    dt_bias = torch.randn(nheads, 1).expand(nheads, headdim)
    args = (state, x, dt, A, B, C, D, z, dt_bias)
    assert canonicalize(*args).x.stride() == (nheads, 1, 0)
    check_against_reference(args)


def test_low_precision_parameters_keep_their_broadcast():
    """A, D, dt_bias in bf16 and given per head: cast once, never materialised per (h, p, n)."""
    args = list(make_inputs("mamba2", bf16, f32))
    args[3], args[6], args[8] = (t.to(bf16) for t in (args[3], args[6], args[8]))
    check_against_reference(tuple(args))


def test_mixed_input_dtypes():
    """dt, B, C in float32 beside x and z in bfloat16, as the reference allows."""
    state, x, dt, A, B, C, D, z, dt_bias = make_inputs("mamba2", bf16, f32)
    args = (state, x, dt.float(), A, B.float(), C.float(), D, z, dt_bias)
    check_against_reference(args)


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_state_is_updated_in_place(layout):
    state, *rest = make_inputs(layout, bf16, bf16)
    before, ptr = state.clone(), state.data_ptr()
    expected = state.clone()
    selective_state_update_ref(expected, *rest, dt_softplus=True)
    selective_state_update(state, *rest, dt_softplus=True, backend="cpu")
    assert state.data_ptr() == ptr and state.dtype == bf16
    assert not torch.equal(state, before)
    assert_close(state, expected, bf16)


def test_state_view_is_written_through():
    """A state that is a strided view of a larger cache (one layer, non-contiguous dstate) updates the cache."""
    cache = torch.randn(2, 3, 4, 6, 5)  # (layer, batch, nheads, dstate, headdim)
    view = cache[1].transpose(-1, -2)  # (batch, nheads, headdim, dstate), dstate stride 5
    _, x, dt, A, B, C, D, z, dt_bias = make_inputs("mamba2", f32, f32, batch=3, nheads=4, headdim=5, dstate=6)
    expected = view.clone()
    y_ref = selective_state_update_ref(expected, x, dt, A, B, C, D, z, dt_bias, True)
    other = cache[0].clone()
    y = selective_state_update(view, x, dt, A, B, C, D, z, dt_bias, True, backend="cpu")
    assert_close(y, y_ref, f32)
    assert_close(cache[1].transpose(-1, -2), expected, f32)
    assert torch.equal(cache[0], other)


def test_large_problem_split_over_threads():
    """Enough (batch, head) rows for several tasks and blocks, with blocks cut at batch boundaries."""
    args = make_inputs("mamba1", f32, f32, batch=3, nheads=75, headdim=20, dstate=16, ngroups=1)
    check_against_reference(args)
    args = make_inputs("mamba2", bf16, f32, batch=5, nheads=24, headdim=64, dstate=32, ngroups=1)
    check_against_reference(args)


def test_extreme_values():
    """Softplus on both sides of its threshold, decays that underflow to 0, gates that saturate."""
    batch, dim, dstate = 2, 400, 8
    state = torch.randn(batch, dim, dstate)
    x = torch.randn(batch, dim)
    dt = torch.linspace(-60, 60, batch * dim).view(batch, dim)
    z = torch.linspace(-100, 100, batch * dim).view(batch, dim).flip(-1)
    A = -torch.logspace(-3, 3, dstate).expand(dim, dstate)
    B, C = torch.randn(batch, dstate), torch.randn(batch, dstate)
    for softplus in (False, True):
        dt_arg = dt if softplus else dt.abs()  # without softplus, dt must be >= 0 for the state to decay
        s_cpu, s_ref = state.clone(), state.clone()
        y = selective_state_update(s_cpu, x, dt_arg, A, B, C, None, z, None, softplus, backend="cpu")
        y_ref = selective_state_update_ref(s_ref, x, dt_arg, A, B, C, None, z, None, softplus)
        assert torch.isfinite(y_ref).all()
        assert_close(y, y_ref, f32)
        assert_close(s_cpu, s_ref, f32)


def test_empty_batch():
    args = make_inputs("mamba2", f32, f32, batch=0)
    y = selective_state_update(*args, backend="cpu")
    assert y.shape == (0, 4, 8)


# ---------------------------------------------------------------- state_batch_indices: a pool of states


@pytest.mark.parametrize("dtype, state_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_pool_matches_reference(layout, dtype, state_dtype):
    args, indices = cases.make_pooled_inputs(layout, dtype, state_dtype)
    cases.check_pooled_against_reference(args, indices, "cpu")


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_pool_with_int32_indices_groups_and_strides(layout):
    args, indices = cases.make_pooled_inputs(layout, f32, f32, index_dtype=torch.int32, ngroups=4, nheads=4,
                                             noncontiguous=True, per_head=False)
    assert not args[0].is_contiguous()
    cases.check_pooled_against_reference(args, indices, "cpu")
    # Indices that are a strided view: every other element of a longer tensor.
    spread = torch.stack([indices, torch.full_like(indices, 99)], dim=1).flatten()[::2]
    cases.check_pooled_against_reference(args, spread, "cpu")


def test_pool_without_optional_inputs():
    args, indices = cases.make_pooled_inputs("mamba2", f32, f32, optional=False)
    cases.check_pooled_against_reference(args, indices, "cpu", dt_softplus=False)


def test_pool_split_over_threads():
    """Padding rows and live rows in tasks and blocks of several (batch, head) rows each."""
    slots = tuple(range(39, -1, -3)) + (-1,) * 3 + (1, 2)
    args, indices = cases.make_pooled_inputs("mamba1", f32, f32, slots=slots, pool=41, nheads=75, headdim=2,
                                             dstate=16, ngroups=1)
    cases.check_pooled_against_reference(args, indices, "cpu")


# ---------------------------------------------------------------- the op's own argument checks


def _canonical(layout="mamba2", dtype=f32):
    return list(canonicalize(*make_inputs(layout, dtype, f32)))


@pytest.mark.parametrize(
    "index, bad, words",
    [
        (1, torch.randn(3, 4, 9), ["x", "shape"]),
        (2, torch.randn(3, 4), ["dt", "shape"]),
        (3, torch.randn(4, 8, 15), ["A", "(nheads, headdim, dstate)"]),
        (5, torch.randn(3, 2, 15), ["C", "(batch, ngroups, dstate)"]),
        (6, torch.randn(5, 8), ["D", "(nheads, headdim)"]),
        (7, torch.randn(3, 4, 8).to(torch.int32), ["z", "dtype"]),
    ],
)
def test_op_names_the_bad_argument(index, bad, words):
    args = _canonical()
    args[index] = bad
    with pytest.raises(RuntimeError) as info:
        selective_state_update_cpu(*args)
    for word in words:
        assert word in str(info.value)


def test_op_checks_that_groups_divide_heads():
    args = _canonical()
    args[4], args[5] = torch.randn(3, 3, 16), torch.randn(3, 3, 16)
    with pytest.raises(RuntimeError, match=r"nheads \(4\) must be divisible by ngroups \(3"):
        selective_state_update_cpu(*args)


@pytest.mark.parametrize(
    "indices, message",
    [
        (torch.tensor([0, 1, 2], dtype=torch.int16), "state_batch_indices must have dtype int32 or int64"),
        (torch.tensor([0, 1]), r"state_batch_indices must have shape \[3\] \(batch\)"),
        (torch.tensor([0, 5, -1]), r"state_batch_indices must be slots in \[0, 5\) of state .* got 5 for batch row 1"),
        (torch.tensor([4, -1, 4], dtype=torch.int32), r"must not repeat a slot .* got 4 more than once"),
    ],
    ids=["int16", "shape", "past_pool", "repeated"],
)
def test_op_checks_the_indices(indices, message):
    args = _canonical()
    args[0] = torch.randn(5, 4, 8, 16)
    with pytest.raises(RuntimeError, match=message):
        selective_state_update_cpu(*args, state_batch_indices=indices)


def test_op_needs_indices_for_a_pool():
    args = _canonical()
    args[0] = torch.randn(5, 4, 8, 16)
    with pytest.raises(RuntimeError, match=r"state must have shape \[3, 4, 8, 16\] \(batch, nheads, headdim"):
        selective_state_update_cpu(*args)


def test_op_refuses_an_overlapping_state():
    args = _canonical()
    args[0] = torch.randn(1, 4, 8, 16).expand(3, 4, 8, 16)
    with pytest.raises(RuntimeError, match="state is updated in place"):
        selective_state_update_cpu(*args)


# ---------------------------------------------------------------- properties


@given(
    batch=st.integers(1, 3),
    nheads=st.sampled_from([1, 2, 6]),
    headdim=st.integers(1, 5),
    dstate=st.integers(1, 19),
    ngroups=st.sampled_from([1, 2]),
    layout=st.sampled_from(["mamba1", "mamba2"]),
    noncontiguous=st.booleans(),
    optional=st.booleans(),
    per_head=st.booleans(),
    dt_softplus=st.booleans(),
)
def test_property_float64_matches_reference(batch, nheads, headdim, dstate, ngroups, layout, noncontiguous,
                                             optional, per_head, dt_softplus):
    ngroups = ngroups if nheads % ngroups == 0 else 1
    args = make_inputs(layout, f64, f64, dstate=dstate, batch=batch, nheads=nheads, headdim=headdim,
                       ngroups=ngroups, noncontiguous=noncontiguous, optional=optional, per_head=per_head)
    check_against_reference(args, dt_softplus=dt_softplus)


# ---------------------------------------------------------------- torch.compile


def _compile_inputs():
    state, x, dt, A, B, C, D, z, dt_bias = make_inputs("mamba2", f32, f32, per_head=True)
    return state, (x, dt, A, B, C, D, z, dt_bias)


def test_compiled_launcher_traces_the_op_in_one_graph():
    state, rest = _compile_inputs()
    canonical = canonicalize(state, *rest)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(state, x, dt, A, B, C, D, z, dt_bias):
        return selective_state_update_cpu(state, x, dt, A, B, C, D, z, dt_bias, True) * 2

    expected_state = state.clone()
    expected = selective_state_update_ref(expected_state, *rest, dt_softplus=True) * 2
    y = step(*canonical)
    assert_close(y, expected, f32)
    assert_close(state, expected_state, f32)  # the in-place update survives functionalisation


def test_compiled_launcher_traces_the_op_with_indices():
    (pool, *rest), indices = cases.make_pooled_inputs("mamba2", f32, f32)
    canonical = canonicalize(pool, *rest, state_batch_indices=indices)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(pool, x, dt, A, B, C, D, z, dt_bias, indices):
        return selective_state_update_cpu(pool, x, dt, A, B, C, D, z, dt_bias, True, indices) * 2

    expected, expected_pool = cases.pooled_step_by_rows((pool, *rest), indices)
    y = step(*canonical, indices)
    assert_close(y, expected * 2, f32)
    assert_close(pool, expected_pool, f32)


def test_compiled_public_function_with_cpu_backend():
    state, rest = _compile_inputs()

    @torch.compile(fullgraph=True, dynamic=False)
    def step(state, x, dt, A, B, C, D, z, dt_bias):
        return selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True, backend="cpu")

    expected_state = state.clone()
    expected = selective_state_update_ref(expected_state, *rest, dt_softplus=True)
    y = step(state, *rest)
    assert_close(y, expected, f32)
    assert_close(state, expected_state, f32)


def test_compiled_public_function_on_a_pool():
    (pool, *rest), indices = cases.make_pooled_inputs("mamba2", f32, f32)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(pool, x, dt, A, B, C, D, z, dt_bias, indices):
        return selective_state_update(pool, x, dt, A, B, C, D, z, dt_bias, True, indices, backend="cpu")

    expected, expected_pool = cases.pooled_step_by_rows((pool, *rest), indices)
    y = step(pool, *rest, indices)
    assert_close(y, expected, f32)
    assert_close(pool, expected_pool, f32)  # the in-place update of the pool survives functionalisation
    bad = indices.clone()
    bad[0] = pool.shape[0]
    with pytest.raises(RuntimeError, match=r"state_batch_indices must be distinct slots in \[0, pool=6\)"):
        step(pool, *rest, bad)


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_threads_agree(layout):
    """The step is split over (batch, channel) rows: the thread count must not change a bit."""
    args = make_inputs(layout, f32, f32, batch=4, nheads=8, headdim=16)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            state = args[0].clone()
            y = selective_state_update(state, *args[1:], dt_softplus=True, backend="cpu")
            results.append((y, state))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
