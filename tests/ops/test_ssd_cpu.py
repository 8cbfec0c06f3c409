"""The C++ CPU SSD scan (csrc/cpu/ssd.cpp) against the chunked reference.

Outputs, final states and every gradient (initial states and through the
final states included). float64 and float32 are compared with the float64
reference within the tight tolerance of their dtype; bfloat16 and float16 with
the flash-attention rule (at most 2x the error of the reference run on the
same low-precision inputs).
"""

import math

import pytest
import torch

from lnlm_ssm.ops import available_backends, mamba_chunk_scan_combined, mamba_chunk_scan_ref
from lnlm_ssm.utils.testing import assert_close, assert_close_to_ref

pytestmark = pytest.mark.skipif(
    "cpu" not in available_backends(), reason="the C++ extension lnlm_ssm._C is not built (pip install -e .)"
)

f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


def _randn(shape, dtype, *, noncontiguous=False, scale=1.0):
    """N(0, scale^2); non-contiguous: reversed dimension order and a gap between elements."""
    if not noncontiguous:
        return (torch.randn(*shape, dtype=f64) * scale).to(dtype)
    base = (torch.randn(*reversed(shape), 2, dtype=f64) * scale).to(dtype)
    return base[..., 0].permute(*reversed(range(len(shape))))


def make_inputs(
    batch=2,
    seqlen=37,
    nheads=4,
    headdim=6,
    ngroups=2,
    dstate=5,
    dtype=f64,
    *,
    D_per_channel=False,
    noncontiguous=False,
    optional=True,
    initial=True,
):
    """Keyword arguments of mamba_chunk_scan_combined (leaves in ``dtype``; A, D, dt_bias and initial states fp32
    for low precision, as a model keeps them)."""
    nc = noncontiguous
    param = f64 if dtype == f64 else f32
    t = dict(
        x=_randn((batch, seqlen, nheads, headdim), dtype, noncontiguous=nc),
        dt=_randn((batch, seqlen, nheads), dtype, noncontiguous=nc, scale=0.5),
        A=(-torch.rand(nheads, dtype=f64) * 2 - 0.1).to(param),
        B=_randn((batch, seqlen, ngroups, dstate), dtype, noncontiguous=nc),
        C=_randn((batch, seqlen, ngroups, dstate), dtype, noncontiguous=nc),
    )
    if optional:
        t["D"] = _randn((nheads, headdim) if D_per_channel else (nheads,), param)
        t["z"] = _randn((batch, seqlen, nheads, headdim), dtype, noncontiguous=nc)
        t["dt_bias"] = _randn((nheads,), param, scale=0.3)
    if initial:
        t["initial_states"] = _randn((batch, nheads, headdim, dstate), param, noncontiguous=nc)
    return {k: v.requires_grad_() for k, v in t.items()}


def run(fn, t, chunk_size, **kw):
    """(y, final_states) and the gradients of <y, gy> + <final, gf> w.r.t. every input, for fixed random gy, gf."""
    y, final = fn(**t, chunk_size=chunk_size, return_final_states=True, **kw)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g, dtype=f64).to(y.dtype)
    gf = torch.randn(final.shape, generator=g, dtype=f64).to(final.dtype)
    grads = torch.autograd.grad((y * gy).float().sum() + (final * gf).float().sum(), list(t.values()))
    return y, final, dict(zip(t, grads))


def cpu(**kw):
    return mamba_chunk_scan_combined(**kw, backend="cpu")


def upcast(t, dtype=f64):
    return {k: v.detach().to(dtype).requires_grad_() for k, v in t.items()}


def check_tight(t, chunk_size, dtype, msg="", **kw):
    """The CPU kernel on ``t`` vs the float64 reference, within ``dtype``'s tolerance."""
    y, final, grads = run(cpu, t, chunk_size, **kw)
    y_ref, final_ref, grads_ref = run(mamba_chunk_scan_ref, upcast(t), chunk_size, **kw)
    assert y.dtype == t["x"].dtype and final.dtype == (f64 if dtype == f64 else f32)
    assert_close(y, y_ref, dtype, msg=f"{msg} y")
    assert_close(final, final_ref, dtype, msg=f"{msg} final_states")
    for name, g in grads.items():
        assert g.dtype == t[name].dtype and g.shape == t[name].shape, name
        assert_close(g, grads_ref[name], dtype, msg=f"{msg} d{name}")


@pytest.mark.parametrize("dtype", [f64, f32])
@pytest.mark.parametrize("chunk_size", [8, 16, 64])
def test_matches_reference(dtype, chunk_size):
    check_tight(make_inputs(dtype=dtype), chunk_size, dtype, dt_softplus=True)


@pytest.mark.parametrize("dtype", [bf16, f16])
def test_low_precision(dtype):
    t = make_inputs(seqlen=70, dtype=dtype)
    kw = dict(chunk_size=32, dt_softplus=True)
    y, final, grads = run(cpu, t, **kw)
    y_lowp, final_lowp, grads_lowp = run(mamba_chunk_scan_ref, t, **kw)
    y_ref, final_ref, grads_ref = run(mamba_chunk_scan_ref, upcast(t), **kw)
    assert y.dtype == dtype and final.dtype == f32
    assert_close_to_ref(y, y_ref, y_lowp, msg="y")
    assert_close_to_ref(final, final_ref, final_lowp, msg="final_states")
    for name, g in grads.items():
        assert g.dtype == t[name].dtype, name
        assert_close_to_ref(g, grads_ref[name], grads_lowp[name], msg=f"d{name}")


@pytest.mark.parametrize(
    "shape",
    [
        dict(seqlen=1),
        dict(seqlen=97),
        dict(seqlen=33, batch=1),
        dict(ngroups=4, nheads=4),
        dict(ngroups=1, nheads=6, dstate=1),
        dict(dstate=7, headdim=1),
        dict(D_per_channel=True),
        dict(noncontiguous=True),
        dict(optional=False, initial=False),
    ],
    ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()),
)
def test_awkward_shapes(shape):
    check_tight(make_inputs(**shape), 16, f64, msg=str(shape), dt_softplus=True)


@pytest.mark.parametrize("dt_softplus, dt_limit", [(False, (0.0, math.inf)), (True, (0.05, 0.8)), (False, (0.0, 0.4))])
def test_dt_map(dt_softplus, dt_limit):
    """Without softplus a negative dt passes unclamped unless a limit is given; the clamp masks its gradient."""
    t = make_inputs()
    with torch.no_grad():
        t["dt"][0, :5] = -0.3
    check_tight(t, 16, f64, dt_softplus=dt_softplus, dt_limit=dt_limit)


@pytest.mark.parametrize("chunk_size", [4, 16, 64])
def test_seq_idx(chunk_size):
    """Packed sequences: boundaries inside chunks, on a chunk boundary (16, 32), and a one-token sequence."""
    lengths = [5, 11, 16, 1, 4]
    t = make_inputs(batch=2, seqlen=sum(lengths))
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    seq_idx = torch.stack([seq_idx, torch.full_like(seq_idx, 3)]).int()
    check_tight(t, chunk_size, f64, dt_softplus=True, seq_idx=seq_idx)


def test_chunk_size_changes_nothing():
    t = make_inputs(seqlen=50)
    y, final, grads = run(cpu, t, 50, dt_softplus=True)
    for chunk_size in (1, 7, 16, 64):
        y_c, final_c, grads_c = run(cpu, t, chunk_size, dt_softplus=True)
        assert_close(y_c, y, msg=f"chunk {chunk_size} y")
        assert_close(final_c, final, msg=f"chunk {chunk_size} final_states")
        for name in grads:
            assert_close(grads_c[name], grads[name], msg=f"chunk {chunk_size} d{name}")


def test_one_output_used():
    """The gradient reaches every input when only y, or only the final states, are used."""
    t = make_inputs()
    t_ref = upcast(t)
    for used in (0, 1):
        out = cpu(**t, chunk_size=16, dt_softplus=True, return_final_states=True)[used]
        ref = mamba_chunk_scan_ref(**t_ref, chunk_size=16, dt_softplus=True, return_final_states=True)[used]
        grads = torch.autograd.grad(out.sum(), list(t.values()), allow_unused=True)
        grads_ref = torch.autograd.grad(ref.sum(), list(t_ref.values()), allow_unused=True)
        for name, g, g_ref in zip(t, grads, grads_ref):
            if g_ref is None:  # z and D do not reach the final states
                assert g is None or not g.any(), name
            else:
                assert_close(g, g_ref, msg=f"output {used}: d{name}")


@pytest.mark.parametrize("A, dt_range", [(-30.0, (0.5, 3.0)), (-2.0, (0.2, 1.0))], ids=["instant", "long-range"])
def test_strong_decay_fp32(A, dt_range):
    """Large cumulative decay in a long chunk (cum reaches -100s to -10000s, most decays flush to 0):
    finite, and within fp32's tolerance of the float64 reference."""
    t = make_inputs(batch=1, seqlen=256, dtype=f32)
    with torch.no_grad():
        t["A"].fill_(A)
        t["dt"].uniform_(*dt_range)
    check_tight(t, 256, f32)


def test_threads_agree():
    """1 and 2 threads agree to rounding (the shape makes the split of a group's heads depend on the thread count)."""
    t = make_inputs(batch=1, seqlen=48, nheads=8, ngroups=1, headdim=4, dtype=f32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(cpu, t, 64, dt_softplus=True))
    finally:
        torch.set_num_threads(before)
    (y1, f1, g1), (y2, f2, g2) = results
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(f1, f2)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], msg=name)


def test_torch_compile_fullgraph():
    """Forward and backward trace through the ops' fake kernels. (Without seq_idx: the public function's check
    that seq_idx is non-decreasing reads its values, which fullgraph cannot trace.)"""
    t = make_inputs(seqlen=20, dtype=f32)

    def f(x, dt, A, B, C, D, z, dt_bias, initial_states):
        y, final = mamba_chunk_scan_combined(
            x, dt, A, B, C, 8, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            dt_softplus=True, return_final_states=True, backend="cpu",
        )
        return y.square().sum() + final.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = list(t.values())
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    loss_eager = f(*args)
    grads_eager = torch.autograd.grad(loss_eager, args)
    assert_close(loss, loss_eager)
    for name, g, g_eager in zip(t, grads, grads_eager):
        assert_close(g, g_eager, msg=name)


def test_opcheck():
    """Schemas, fake kernels (shapes, dtypes, strides) and dispatch of the two ops, as torch.library checks them."""
    from lnlm_ssm.ops import _library

    ops = _library.load()
    t = {k: v.detach() for k, v in make_inputs(seqlen=19, D_per_channel=True, dtype=f32).items()}
    seq_idx = torch.tensor([[0] * 7 + [1] * 12, [2] * 19])
    config = (8, True, 0.0, math.inf)
    base = (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"])
    fwd_args = (*base, t["initial_states"], seq_idx, *config)
    torch.library.opcheck(ops.ssd_chunk_scan_fwd, fwd_args)
    out, final, chunk_states = ops.ssd_chunk_scan_fwd(*fwd_args)
    grads = (torch.randn_like(out), torch.randn_like(final), torch.randn_like(chunk_states))
    torch.library.opcheck(ops.ssd_chunk_scan_bwd, (*grads, *base, seq_idx, chunk_states, *config))


def packed(lengths, dtype=f64, **shape):
    """Inputs of one row holding sequences of ``lengths``; seq_idx and cu_seqlens marking them."""
    t = make_inputs(batch=1, seqlen=sum(lengths), dtype=dtype, **shape)
    lengths = torch.tensor(lengths)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None].int()
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    return t, dict(seq_idx=seq_idx, cu_seqlens=cu_seqlens)


def run_varlen(fn, t, chunk_size, used=(0, 1, 2), **kw):
    """(y, final_states, varlen_states) and the gradients of the sum of <output, fixed random weights> over the
    outputs ``used`` w.r.t. every input."""
    outputs = fn(**t, chunk_size=chunk_size, return_final_states=True, return_varlen_states=True, **kw)
    g = torch.Generator().manual_seed(2)
    loss = sum((outputs[i] * torch.randn(outputs[i].shape, generator=g, dtype=f64).to(outputs[i].dtype)).float().sum()
               for i in used)
    grads = torch.autograd.grad(loss, list(t.values()), allow_unused=True)
    return outputs, dict(zip(t, grads))


VARLEN_PACKINGS = {
    "inside-chunks": [5, 11, 1, 20],
    "on-chunk-boundaries": [16, 16, 5],
    "empty-sequences": [0, 9, 0, 12, 0],
    "one-sequence": [37],
}


@pytest.mark.parametrize("packing", VARLEN_PACKINGS)
@pytest.mark.parametrize("initial", [True, False], ids=["initial_states", "no-initial_states"])
@pytest.mark.parametrize("dtype", [f64, f32])
def test_varlen_states(packing, initial, dtype):
    """Varlen states and the gradients through them (with y's and the final states'), against the reference."""
    t, kw = packed(VARLEN_PACKINGS[packing], dtype, initial=initial)
    kw.update(dt_softplus=True)
    outputs, grads = run_varlen(cpu, t, 16, **kw)
    outputs_ref, grads_ref = run_varlen(mamba_chunk_scan_ref, upcast(t), 16, **kw)
    assert outputs[2].dtype == dtype and outputs[2].shape == (len(VARLEN_PACKINGS[packing]), 4, 6, 5)
    for name, out, ref in zip(("y", "final_states", "varlen_states"), outputs, outputs_ref):
        assert_close(out, ref, dtype, msg=name)
    for name, g in grads.items():
        assert_close(g, grads_ref[name], dtype, msg=f"d{name}")


def test_varlen_states_alone():
    """Only the varlen states used: the gradient reaches the inputs through them alone."""
    t, kw = packed([7, 20, 10])
    _, grads = run_varlen(cpu, t, 16, used=(2,), dt_softplus=True, **kw)
    _, grads_ref = run_varlen(mamba_chunk_scan_ref, upcast(t), 16, used=(2,), dt_softplus=True, **kw)
    for name, g_ref in grads_ref.items():
        if g_ref is None:  # C, D and z do not reach the states
            assert grads[name] is None or not grads[name].any(), name
        else:
            assert g_ref.abs().sum() > 0, name
            assert_close(grads[name], g_ref, msg=f"d{name}")


@pytest.mark.parametrize("dtype", [bf16, f16])
def test_varlen_states_low_precision(dtype):
    """Low-precision inputs: the varlen states come in C's dtype (as mamba_ssm's), or in state_dtype."""
    t, kw = packed([9, 30, 31], dtype)
    kw.update(dt_softplus=True)
    outputs, grads = run_varlen(cpu, t, 32, **kw)
    outputs_lowp, grads_lowp = run_varlen(mamba_chunk_scan_ref, t, 32, **kw)
    outputs_ref, grads_ref = run_varlen(mamba_chunk_scan_ref, upcast(t), 32, **kw)
    assert outputs[2].dtype == dtype
    for name, out, ref, lowp in zip(("y", "final_states", "varlen_states"), outputs, outputs_ref, outputs_lowp):
        assert_close_to_ref(out, ref, lowp, msg=name)
    for name, g in grads.items():
        assert_close_to_ref(g, grads_ref[name], grads_lowp[name], msg=f"d{name}")
    (_, final32, varlen32), _ = run_varlen(cpu, t, 32, state_dtype=f32, **kw)
    assert varlen32.dtype == f32 and torch.equal(varlen32.to(dtype), outputs[2])
    assert torch.equal(final32, outputs[1])


def test_varlen_states_without_tokens():
    """seqlen 0 (the scan has no chunk): every sequence is empty and its state zero, as the reference's."""
    t, kw = packed([0, 0])
    y, varlen = cpu(**t, chunk_size=16, return_varlen_states=True, **kw)
    _, varlen_ref = mamba_chunk_scan_ref(**t, chunk_size=16, return_varlen_states=True, **kw)
    assert y.shape == (1, 0, 4, 6) and varlen.shape == varlen_ref.shape == (2, 4, 6, 5)
    assert not varlen.any() and not varlen_ref.any()
