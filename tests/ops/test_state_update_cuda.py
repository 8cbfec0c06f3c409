"""The CUDA decode step (csrc/cuda/state_update) against the reference.

Needs a CUDA GPU and the extension lnlm_ssm._cuda; every test is skipped with
the reason otherwise. Expected values come from the reference run in float64 on
the same inputs; the low-precision reference is also checked with the
flash-attention rule (``assert_close_to_ref``).
"""

import pytest
import torch

from lnlm_ssm.ops.state_update.reference import selective_state_update_ref
from lnlm_ssm.ops.state_update.shapes import canonicalize
from lnlm_ssm.utils.testing import assert_close, assert_close_to_ref
import state_update_cases as cases


def _cuda_unavailable_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import lnlm_ssm.ops.state_update.cuda  # noqa: F401
    except ImportError as exc:
        return (
            f"the CUDA extension lnlm_ssm._cuda is not built ({exc}); build it with a CUDA build of torch "
            "and nvcc: LNLM_SSM_CUDA=1 pip install --no-build-isolation -v -e ."
        )
    return None


_REASON = _cuda_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
f64 = torch.float64


@pytest.fixture
def op():
    from lnlm_ssm.ops.state_update.cuda import selective_state_update_cuda

    return selective_state_update_cuda


def _randn(shape, dtype, *, noncontiguous=False, scale=1.0):
    """A CUDA tensor of ``shape``; non-contiguous means reversed dimension order and a gap between elements."""
    if not noncontiguous:
        return torch.randn(*shape, device="cuda", dtype=dtype) * scale
    base = torch.randn(*reversed(shape), 2, device="cuda", dtype=dtype) * scale
    t = base[..., 0].permute(*reversed(range(len(shape))))
    assert t.shape == tuple(shape) and not t.is_contiguous()
    return t


def make_inputs(layout, dtype, state_dtype, dstate, *, batch=3, nheads=4, headdim=8, ngroups=2,
                noncontiguous=False, optional=True, grouped_mamba1=True):
    """Arguments of selective_state_update in the Mamba-1 or the Mamba-2 layout, on the GPU.

    Mamba-2 gets its per-head parameters as (nheads,) and dt as (batch, nheads), so
    the canonical form broadcasts them with stride 0, as the Mamba2 module does.
    """
    nc = noncontiguous
    if layout == "mamba1":
        dim = nheads * headdim
        state = _randn((batch, dim, dstate), state_dtype, noncontiguous=nc)
        x, dt, z = (_randn((batch, dim), dtype, noncontiguous=nc) for _ in range(3))
        A = -torch.exp(_randn((dim, dstate), torch.float32, noncontiguous=nc, scale=0.5))
        bc_shape = (batch, ngroups, dstate) if grouped_mamba1 else (batch, dstate)
        D, dt_bias = _randn((dim,), torch.float32), _randn((dim,), torch.float32, scale=0.5)
    else:
        state = _randn((batch, nheads, headdim, dstate), state_dtype, noncontiguous=nc)
        x, z = (_randn((batch, nheads, headdim), dtype, noncontiguous=nc) for _ in range(2))
        dt = _randn((batch, nheads), dtype, noncontiguous=nc)
        A = -torch.exp(_randn((nheads,), torch.float32, scale=0.5))
        bc_shape = (batch, ngroups, dstate)
        D, dt_bias = _randn((nheads,), torch.float32), _randn((nheads,), torch.float32, scale=0.5)
    B, C = (_randn(bc_shape, dtype, noncontiguous=nc) for _ in range(2))
    if not optional:
        D = z = dt_bias = None
    return dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)


def run_cuda(op, args, dt_softplus):
    """The CUDA op on the canonical form; y in the caller's layout."""
    s = canonicalize(**args)
    y = op(*s, dt_softplus=dt_softplus)
    return y.squeeze(-1) if args["state"].ndim == 3 else y


def run_reference(args, dt_softplus, dtype=None):
    """The reference on copies (upcast to ``dtype`` if given); returns (y, new state)."""
    cast = (lambda t: t.to(dtype, copy=True)) if dtype is not None else (lambda t: t.clone())
    ref = {k: (None if v is None else cast(v)) for k, v in args.items()}
    y = selective_state_update_ref(**ref, dt_softplus=dt_softplus)
    return y, ref["state"]


def check_against_reference(op, args, dt_softplus=True):
    """Runs the CUDA op in place on ``args["state"]`` and checks y and the state."""
    dtype, state = args["x"].dtype, args["state"]
    y64, state64 = run_reference(args, dt_softplus, f64)
    y_lowp, state_lowp = run_reference(args, dt_softplus)
    data_ptr, strides = state.data_ptr(), state.stride()

    y = run_cuda(op, args, dt_softplus)

    assert y.dtype == dtype and y.shape == args["x"].shape
    assert state.data_ptr() == data_ptr and state.stride() == strides and state.dtype == state_lowp.dtype
    assert_close(y, y64, dtype, msg="y")
    assert_close(state, state64, state.dtype, msg="state")
    assert_close_to_ref(y, y64, y_lowp, msg="y")
    assert_close_to_ref(state, state64, state_lowp, msg="state")
    return y


@pytest.mark.parametrize("dstate", [1, 16, 64, 128, 256])
@pytest.mark.parametrize("state_in_input_dtype", [False, True], ids=["state_fp32", "state_lowp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_matches_reference(op, layout, dtype, state_in_input_dtype, dstate):
    state_dtype = dtype if state_in_input_dtype else torch.float32
    check_against_reference(op, make_inputs(layout, dtype, state_dtype, dstate, ngroups=2))


@pytest.mark.parametrize("dstate", [5, 33, 200])
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_odd_dstate_and_many_groups(op, layout, dstate):
    # ngroups == nheads: every head reads its own B and C; batch 1.
    check_against_reference(op, make_inputs(layout, torch.float32, torch.float32, dstate, batch=1, ngroups=4))


def test_mamba1_ungrouped_B_C(op):
    args = make_inputs("mamba1", torch.bfloat16, torch.float32, 16, grouped_mamba1=False)
    assert args["B"].shape == (3, 16)
    check_against_reference(op, args)


@pytest.mark.parametrize("dt_softplus", [False, True])
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_without_D_z_dt_bias(op, layout, dt_softplus):
    args = make_inputs(layout, torch.float16, torch.float32, 16, optional=False)
    args["dt"] = args["dt"].abs()  # without softplus, dt is used as given: keep it positive
    check_against_reference(op, args, dt_softplus=dt_softplus)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_non_contiguous_inputs(op, layout, dtype):
    args = make_inputs(layout, dtype, torch.float32, 64, noncontiguous=True)
    for name in ("state", "x", "B", "C"):
        assert not args[name].is_contiguous(), name
    base = args["state"]._base
    before = base.clone()
    check_against_reference(op, args)
    # The update went through the strides of the view: the gaps between its elements are untouched.
    written = torch.zeros_like(base, dtype=torch.bool)
    written.as_strided(args["state"].shape, args["state"].stride(), args["state"].storage_offset()).fill_(True)
    assert torch.equal(base[~written], before[~written])


def test_stride0_A_D_dt_bias_canonical(op):
    # The canonical form as the Mamba2 module passes it: per-head values expanded with stride 0.
    batch, nheads, headdim, ngroups, dstate = 2, 6, 16, 3, 128
    args = make_inputs("mamba2", torch.bfloat16, torch.float32, dstate, batch=batch, nheads=nheads,
                       headdim=headdim, ngroups=ngroups)
    args["A"] = args["A"][:, None, None].expand(nheads, headdim, dstate)
    args["D"] = args["D"][:, None].expand(nheads, headdim)
    args["dt_bias"] = args["dt_bias"][:, None].expand(nheads, headdim)
    args["dt"] = args["dt"][:, :, None].expand(batch, nheads, headdim)
    s = canonicalize(**args)
    assert s.A.stride() == (1, 0, 0) and s.D.stride() == (1, 0) and s.dt_bias.stride() == (1, 0)
    assert s.dt.stride()[-1] == 0
    check_against_reference(op, args)


def test_softplus_threshold(op):
    # softplus(dt) is dt itself above 20 and log1p(exp(dt)) below; both sides of the switch.
    args = make_inputs("mamba2", torch.float32, torch.float32, 16, batch=2, nheads=4, optional=True)
    args["dt"] = torch.tensor([[-30.0, 0.5, 19.9, 20.5], [25.0, -3.0, 20.0, 40.0]], device="cuda")
    args["dt_bias"] = torch.zeros_like(args["dt_bias"])
    args["A"] = torch.full_like(args["A"], -0.01)  # keep exp(dt * A) away from 0 for large dt
    check_against_reference(op, args)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_updated_in_place_and_repeated_steps(op, state_dtype):
    args = make_inputs("mamba2", torch.bfloat16, state_dtype, 64)
    ref_state = args["state"].to(f64)
    for step in range(4):
        args.update({k: _randn(args[k].shape, args[k].dtype) for k in ("x", "dt", "B", "C", "z")})
        ref_args = {**{k: (None if v is None else v.to(f64)) for k, v in args.items()}, "state": ref_state}
        y_ref = selective_state_update_ref(**ref_args, dt_softplus=True)
        y = run_cuda(op, args, True)
        assert_close(y, y_ref, torch.bfloat16, msg=f"y, step {step}")
        assert_close(args["state"], ref_state, state_dtype, msg=f"state, step {step}")


def test_wrapper_casts_A_D_dt_bias_to_float32(op):
    args = make_inputs("mamba2", torch.float16, torch.float32, 16)
    for name in ("A", "D", "dt_bias"):
        args[name] = args[name].half()
    check_against_reference(op, args)


def test_runs_on_the_current_stream(op):
    args = make_inputs("mamba2", torch.float32, torch.float32, 128, batch=8, nheads=8, headdim=64)
    y64, state64 = run_reference(args, True, f64)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = run_cuda(op, args, True)
    torch.cuda.current_stream().wait_stream(stream)
    assert_close(y, y64, torch.float32)
    assert_close(args["state"], state64, torch.float32)


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_empty_batch(op, layout):
    args = make_inputs(layout, torch.float16, torch.float32, 16, batch=0)
    y = run_cuda(op, args, True)
    assert y.shape == args["x"].shape and y.dtype == torch.float16


# ---------------------------------------------------------------- state_batch_indices: a pool of states


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype, state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float16)], ids=str)
@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
@pytest.mark.usefixtures("op")
def test_pool_matches_reference(layout, dtype, state_dtype, index_dtype):
    args, indices = cases.make_pooled_inputs(layout, dtype, state_dtype, index_dtype=index_dtype, device="cuda",
                                             dstate=64, ngroups=4, nheads=4)
    cases.check_pooled_against_reference(args, indices, "cuda")


@pytest.mark.usefixtures("op")
def test_pool_without_optional_inputs_and_strided_indices():
    args, indices = cases.make_pooled_inputs("mamba2", torch.float16, torch.float32, device="cuda", optional=False,
                                             noncontiguous=True)
    spread = torch.stack([indices, torch.full_like(indices, 99)], dim=1).flatten()[::2]
    cases.check_pooled_against_reference(args, spread, "cuda")


def test_raw_op_skips_an_index_past_the_pool(op):
    """The kernel never addresses memory outside the state, even for an index the public function refuses."""
    (pool, *rest), _ = cases.make_pooled_inputs("mamba2", torch.float32, torch.float32, device="cuda")
    s = canonicalize(pool, *rest, state_batch_indices=torch.tensor(cases.SLOTS, device="cuda"))
    before = pool.clone()
    y = op(*s, dt_softplus=True, state_batch_indices=torch.full((len(cases.SLOTS),), pool.shape[0], device="cuda"))
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(pool, before)


def _raw_args(dstate=16, dtype=torch.float32):
    s = canonicalize(**make_inputs("mamba2", dtype, torch.float32, dstate))
    return dict(s._asdict(), A=s.A.float(), D=s.D.float(), dt_bias=s.dt_bias.float())


def _raw_call(args):
    return torch.ops.lnlm_ssm.selective_state_update(
        args["state"], args["x"], args["dt"], args["A"], args["B"], args["C"], args["D"], args["z"],
        args["dt_bias"], True, args.get("state_batch_indices"),
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {"A": a["A"].half()}, "A must have dtype Float"),
        (lambda a: {"D": a["D"].double()}, "D must have dtype Float"),
        (lambda a: {"B": a["B"].half()}, "B must have dtype Float"),
        (lambda a: {"state": a["state"].half()}, "state must have dtype float32 or the dtype of x"),
        (lambda a: {"x": a["x"].double(), "dt": a["dt"].double(), "B": a["B"].double(), "C": a["C"].double(),
                    "z": a["z"].double()}, "backend=\"reference\""),
        (lambda a: {"C": a["C"].cpu()}, "C must be a CUDA tensor"),
        (lambda a: {"x": a["x"][:, :, :-1]}, "x must have shape"),
        (lambda a: {"z": a["z"][0]}, "z must have 3 dimensions"),
        (lambda a: {"B": a["B"][:, :1].expand(-1, 3, -1), "C": a["C"][:, :1].expand(-1, 3, -1)},
         "must be divisible by ngroups"),
        (lambda a: {"state": a["state"][:1].expand_as(a["state"])}, "single memory location"),
        (lambda a: {"state_batch_indices": torch.arange(3, device="cuda", dtype=torch.int16)},
         "state_batch_indices must have dtype int32 or int64"),
        (lambda a: {"state_batch_indices": torch.arange(2, device="cuda")}, "state_batch_indices must have shape"),
        (lambda a: {"state_batch_indices": torch.arange(3)}, "state_batch_indices must be a CUDA tensor"),
        (lambda a: {"state": torch.zeros(5, *a["state"].shape[1:], device="cuda")}, r"state must have shape \(batch"),
    ],
    ids=["A_half", "D_double", "B_dtype", "state_dtype", "float64", "C_cpu", "x_shape", "z_dims", "ngroups",
         "state_overlap", "indices_dtype", "indices_shape", "indices_cpu", "pool_without_indices"],
)
@pytest.mark.usefixtures("op")  # loads the extensions that define and implement the raw op
def test_raw_op_rejects_bad_arguments(change, message):
    args = _raw_args()
    args.update(change(args))
    with pytest.raises(RuntimeError, match=message):
        _raw_call(args)


@pytest.mark.usefixtures("op")
def test_raw_op_rejects_dstate_over_256():
    with pytest.raises(RuntimeError, match="dstate .* at most 256"):
        _raw_call(_raw_args(dstate=257))


def test_offsets_beyond_int32(op):
    """state holds more than 2**31 elements: every offset must be computed in 64 bits.

    Runs the kernel on the whole state and checks the first and the last batch
    entries (the latter lie past element 2**31) against the reference on those
    slices alone, which keeps the reference's memory small.
    """
    batch, nheads, headdim, dstate, ngroups = 4100, 64, 64, 128, 8
    numel = batch * nheads * headdim * dstate
    assert numel > 2**31
    need = numel * 2 + (1 << 30)  # the float16 state plus headroom
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    dtype = torch.float16
    args = make_inputs("mamba2", dtype, torch.float32, dstate, batch=1, nheads=nheads, headdim=headdim, ngroups=ngroups)
    args["state"] = torch.empty(batch, nheads, headdim, dstate, device="cuda", dtype=dtype).normal_()
    for name in ("x", "z"):
        args[name] = _randn((batch, nheads, headdim), dtype)
    args["dt"] = _randn((batch, nheads), dtype)
    args["B"], args["C"] = _randn((batch, ngroups, dstate), dtype), _randn((batch, ngroups, dstate), dtype)
    slices = {"first": slice(0, 2), "last": slice(batch - 2, batch)}
    per_batch = ("state", "x", "dt", "B", "C", "z")
    expected = {}
    for where, sl in slices.items():
        sliced = {k: (v[sl] if k in per_batch else v) for k, v in args.items()}
        expected[where] = run_reference(sliced, True, f64)
    assert (batch - 2) * nheads * headdim * dstate > 2**31  # the last slice starts past int32

    y = run_cuda(op, args, True)
    for where, sl in slices.items():
        y64, state64 = expected[where]
        assert_close(y[sl], y64, dtype, msg=f"y, {where} batch entries")
        assert_close(args["state"][sl], state64, dtype, msg=f"state, {where} batch entries")
