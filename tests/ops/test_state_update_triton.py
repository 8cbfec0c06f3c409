"""The Triton decode step (ops/state_update/triton.py) against the reference.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors. Triton
reads TRITON_INTERPRET when a kernel is decorated, that is when
``lnlm_ssm.ops.state_update.triton`` is imported, not when triton itself is
imported; that module is imported lazily, on the first call with
backend="triton", so setting the variable at the top of this module (before any
test runs) is enough even when another module imported triton first. The
backend probe is cached, and may have run during collection before the variable
was set: the fixture below clears it.

Expected values: the reference on the same inputs (fp32 tight) and, for
bf16/fp16, the flash-attention rule against the reference in float64.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from lnlm_ssm.ops import _backends, selective_state_update, selective_state_update_ref  # noqa: E402
from lnlm_ssm.ops.state_update.shapes import canonicalize  # noqa: E402
from lnlm_ssm.utils.testing import assert_close  # noqa: E402
import state_update_cases as cases  # noqa: E402
from state_update_cases import to_float64  # noqa: E402

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# (input dtype, state dtype): the state is float32 or the input dtype.
DTYPES = [(f32, f32), (bf16, f32), (bf16, bf16), (f16, f32), (f16, f16)]


@pytest.fixture(autouse=True, scope="module")
def _triton_usable():
    _backends._probe.cache_clear()
    reason = _backends.backend_report()["triton"]
    if reason != "available":
        pytest.skip(reason)


def make_inputs(*args, **kwargs):
    return cases.make_inputs(*args, device=DEVICE, **kwargs)


def check_against_reference(args, dt_softplus=True, msg=""):
    return cases.check_against_reference(args, "triton", dt_softplus, msg)


def make_pooled_inputs(*args, **kwargs):
    return cases.make_pooled_inputs(*args, device=DEVICE, **kwargs)


@pytest.mark.parametrize("dtype, state_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_matches_reference(layout, dtype, state_dtype):
    check_against_reference(make_inputs(layout, dtype, state_dtype))


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dstate", [1, 5, 37])
@pytest.mark.parametrize("dt_softplus", [False, True])
def test_odd_dstate_and_softplus(layout, dstate, dt_softplus):
    args = make_inputs(layout, f32, f32, dstate=dstate, ngroups=1, per_head=dstate % 2 == 1)
    if not dt_softplus:
        args = args[:2] + (args[2].abs(),) + args[3:]  # used as given: keep dt >= 0 so the state decays
    check_against_reference(args, dt_softplus=dt_softplus, msg=f"dstate={dstate}")


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_without_optional_inputs(layout):
    check_against_reference(make_inputs(layout, f16, f32, optional=False))


@pytest.mark.parametrize("dtype, state_dtype", [(f32, f32), (bf16, f32)], ids=str)
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_noncontiguous_inputs(layout, dtype, state_dtype):
    args = make_inputs(layout, dtype, state_dtype, noncontiguous=True, per_head=False)
    assert not args[0].is_contiguous() and not args[1].is_contiguous()
    y, _ = check_against_reference(args)
    assert y.is_contiguous()


@pytest.mark.parametrize("ngroups", [1, 4, 8])
def test_groups(ngroups):
    # headdim 3 and 8 heads: a block of rows spans heads of several groups.
    check_against_reference(make_inputs("mamba2", f32, f32, nheads=8, headdim=3, ngroups=ngroups))


def test_stride_zero_inputs():
    """Every input that can be is a broadcast view; only the state owns its memory."""
    batch, nheads, headdim, dstate, ngroups = 3, 4, 5, 6, 2
    state = torch.randn(batch, nheads, headdim, dstate, device=DEVICE)
    x = torch.randn(batch, nheads, 1, device=DEVICE).expand(batch, nheads, headdim)
    z = torch.randn(1, nheads, headdim, device=DEVICE).expand(batch, nheads, headdim)
    dt = torch.rand(batch, 1, 1, device=DEVICE).expand(batch, nheads, headdim)
    A = -torch.rand(nheads, 1, dstate, device=DEVICE).expand(nheads, headdim, dstate)
    B = torch.randn(1, ngroups, dstate, device=DEVICE).expand(batch, ngroups, dstate)
    C = torch.randn(batch, ngroups, 1, device=DEVICE).expand(batch, ngroups, dstate)
    D = torch.randn(1, headdim, device=DEVICE).expand(nheads, headdim)
    dt_bias = torch.randn(nheads, 1, device=DEVICE).expand(nheads, headdim)
    args = (state, x, dt, A, B, C, D, z, dt_bias)
    assert canonicalize(*args).x.stride() == (nheads, 1, 0)
    check_against_reference(args)


def test_mixed_and_low_precision_parameters():
    """dt, B, C in float32 beside bf16 x and z; A, D, dt_bias in bf16."""
    state, x, dt, A, B, C, D, z, dt_bias = make_inputs("mamba2", bf16, f32)
    check_against_reference((state, x, dt.float(), A.to(bf16), B.float(), C.float(), D.to(bf16), z, dt_bias.to(bf16)))


def test_state_view_is_written_through():
    """A state that is a strided view of a larger cache (one layer, non-contiguous dstate) updates the cache."""
    cache = torch.randn(2, 3, 4, 6, 5, device=DEVICE)  # (layer, batch, nheads, dstate, headdim)
    view = cache[1].transpose(-1, -2)
    _, x, dt, A, B, C, D, z, dt_bias = make_inputs("mamba2", f32, f32, batch=3, nheads=4, headdim=5, dstate=6)
    expected = view.clone()
    y_ref = selective_state_update_ref(expected, x, dt, A, B, C, D, z, dt_bias, True)
    other = cache[0].clone()
    y = selective_state_update(view, x, dt, A, B, C, D, z, dt_bias, True, backend="triton")
    assert_close(y, y_ref, f32)
    assert_close(cache[1].transpose(-1, -2), expected, f32)
    assert torch.equal(cache[0], other)


def test_repeated_steps_follow_the_reference():
    state, x, dt, A, B, C, D, z, dt_bias = make_inputs("mamba2", bf16, bf16)
    ref_state = state.to(f64)
    for step in range(3):
        x, z, dt = (torch.randn_like(t) for t in (x, z, dt))
        y = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True, backend="triton")
        y64 = selective_state_update_ref(ref_state, *map(to_float64, (x, dt, A, B, C, D, z, dt_bias)), True)
        assert_close(y, y64, bf16, msg=f"y, step {step}")
        assert_close(state, ref_state, bf16, msg=f"state, step {step}")


def test_extreme_values():
    """Softplus on both sides of its threshold, decays that underflow to 0, gates that saturate."""
    batch, dim, dstate = 2, 64, 8
    state = torch.randn(batch, dim, dstate, device=DEVICE)
    x = torch.randn(batch, dim, device=DEVICE)
    dt = torch.linspace(-60, 60, batch * dim, device=DEVICE).view(batch, dim)
    z = torch.linspace(-100, 100, batch * dim, device=DEVICE).view(batch, dim).flip(-1)
    A = -torch.logspace(-3, 3, dstate, device=DEVICE).expand(dim, dstate)
    B, C = torch.randn(batch, dstate, device=DEVICE), torch.randn(batch, dstate, device=DEVICE)
    for softplus in (False, True):
        dt_arg = dt if softplus else dt.abs()
        s_tri, s_ref = state.clone(), state.clone()
        y = selective_state_update(s_tri, x, dt_arg, A, B, C, None, z, None, softplus, backend="triton")
        y_ref = selective_state_update_ref(s_ref, x, dt_arg, A, B, C, None, z, None, softplus)
        assert torch.isfinite(y_ref).all()
        assert_close(y, y_ref, f32)
        assert_close(s_tri, s_ref, f32)


def test_empty_batch():
    y = selective_state_update(*make_inputs("mamba2", f32, f32, batch=0), backend="triton")
    assert y.shape == (0, 4, 8)


def test_refuses_float64_and_overlapping_state():
    args = make_inputs("mamba2", f64, f64)
    with pytest.raises(TypeError, match="float64.*backend='reference' or 'cpu'"):
        selective_state_update(*args, backend="triton")
    state, *rest = make_inputs("mamba2", f32, f32)
    with pytest.raises(ValueError, match="state is updated in place"):
        selective_state_update(state[:1].expand_as(state), *rest, backend="triton")


def test_compiled_step_is_one_graph():
    state, *rest = make_inputs("mamba2", f32, f32)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(state, x, dt, A, B, C, D, z, dt_bias):
        return selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True, backend="triton") * 2

    expected_state = state.clone()
    expected = selective_state_update_ref(expected_state, *rest, dt_softplus=True) * 2
    y = step(state, *rest)
    assert_close(y, expected, f32)
    assert_close(state, expected_state, f32)  # the in-place update survives functionalisation


# ---------------------------------------------------------------- state_batch_indices: a pool of states


@pytest.mark.parametrize("dtype, state_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_pool_matches_reference(layout, dtype, state_dtype):
    args, indices = make_pooled_inputs(layout, dtype, state_dtype)
    cases.check_pooled_against_reference(args, indices, "triton")


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_pool_with_int32_indices_groups_and_strides(layout):
    # headdim 3: a block of rows spans heads of several groups.
    args, indices = make_pooled_inputs(layout, f32, f32, index_dtype=torch.int32, ngroups=4, nheads=4, headdim=3,
                                       noncontiguous=True, per_head=False)
    assert not args[0].is_contiguous()
    cases.check_pooled_against_reference(args, indices, "triton")
    spread = torch.stack([indices, torch.full_like(indices, 99)], dim=1).flatten()[::2]
    cases.check_pooled_against_reference(args, spread, "triton")


def test_pool_without_optional_inputs():
    args, indices = make_pooled_inputs("mamba2", f16, f32, optional=False)
    cases.check_pooled_against_reference(args, indices, "triton")


def test_compiled_step_on_a_pool_is_one_graph():
    (pool, *rest), indices = make_pooled_inputs("mamba2", f32, f32)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(pool, x, dt, A, B, C, D, z, dt_bias, indices):
        return selective_state_update(pool, x, dt, A, B, C, D, z, dt_bias, True, indices, backend="triton") * 2

    expected, expected_pool = cases.pooled_step_by_rows((pool, *rest), indices)
    y = step(pool, *rest, indices)
    assert_close(y, expected * 2, f32)
    assert_close(pool, expected_pool, f32)


# ---------------------------------------------------------------- GPU only: real sizes


@pytest.mark.skipif(not GPU, reason="real sizes need a CUDA GPU (the interpreter is too slow for them)")
@pytest.mark.parametrize("dstate", [16, 128, 256])
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_real_sizes_on_gpu(layout, dstate):
    # d_inner 3072 either way: Mamba-1 as 3072 channels, Mamba-2 as 48 heads of 64.
    nheads, headdim = (192, 16) if layout == "mamba1" else (48, 64)
    args = make_inputs(layout, bf16, f32, dstate=dstate, batch=16, nheads=nheads, headdim=headdim, ngroups=1)
    check_against_reference(args)


@pytest.mark.skipif(not GPU, reason="real sizes need a CUDA GPU (the interpreter is too slow for them)")
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_pool_real_sizes_on_gpu(layout):
    nheads, headdim = (192, 16) if layout == "mamba1" else (48, 64)
    slots = tuple(range(60, 0, -5)) + (-1, -1)
    args, indices = make_pooled_inputs(layout, bf16, f32, slots=slots, pool=64, dstate=128, nheads=nheads,
                                       headdim=headdim, ngroups=1)
    cases.check_pooled_against_reference(args, indices, "triton")


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU with about 6 GiB free")
def test_offsets_beyond_int32_on_gpu():
    batch, nheads, headdim, dstate = 4100, 64, 64, 128
    assert batch * nheads * headdim * dstate > 2**31
    if torch.cuda.mem_get_info()[0] < 6 * 2**30:
        pytest.skip("needs about 6 GiB of free GPU memory")
    state = torch.randn(batch, nheads, headdim, dstate, device=DEVICE, dtype=f16)
    x, z = (torch.randn(batch, nheads, headdim, device=DEVICE, dtype=f16) for _ in range(2))
    dt = torch.randn(batch, nheads, device=DEVICE, dtype=f16)
    B, C = (torch.randn(batch, 1, dstate, device=DEVICE, dtype=f16) for _ in range(2))
    A, D, dt_bias = -torch.rand(nheads, device=DEVICE), torch.randn(nheads, device=DEVICE), torch.zeros(nheads, device=DEVICE)
    last = slice(batch - 2, batch)
    ref_state = state[last].clone()
    y_ref = selective_state_update_ref(ref_state, x[last], dt[last], A, B[last], C[last], D, z[last], dt_bias, True)
    y = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True, backend="triton")
    assert_close(y[last], y_ref, f16)
    assert_close(state[last], ref_state, f16)
