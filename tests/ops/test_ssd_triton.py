"""The Triton SSD scan (lnlm_ssm/ops/ssd/triton*.py) against the chunked reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. Triton
3.x reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, not when
triton is imported, so the variable is set here before the kernel modules are
imported; if another test imported them compiled first, they are reloaded (the
launchers look the kernels up on their modules at each call). The interpreter is
slow: shapes are tiny. Outputs, final states and every gradient are compared:
fp32 within fp32's tolerance of the float64 reference, bf16/fp16 by the 2x rule.
"""

import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from test_ssd_cpu import make_inputs, packed, run, run_varlen, upcast  # noqa: E402

from lnlm_ssm.ops import _backends, mamba_chunk_scan_combined, mamba_chunk_scan_ref  # noqa: E402
from lnlm_ssm.utils.testing import assert_close, assert_close_to_ref  # noqa: E402

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreted_kernels():
    from triton.runtime.interpreter import InterpretedFunction

    for name in ("lnlm_ssm.ops.ssd.triton_kernels", "lnlm_ssm.ops.ssd.triton_kernels_bwd"):
        module = importlib.import_module(name)
        if not isinstance(module.chunk_state_kernel if name.endswith("kernels") else module.chunk_scan_bwd_dx_kernel,
                          InterpretedFunction):
            importlib.reload(module)


if DEVICE == "cpu":
    _interpreted_kernels()

from lnlm_ssm.ops.ssd.triton import mamba_chunk_scan_triton  # noqa: E402


def on_device(t):
    return {k: v.detach().to(DEVICE).requires_grad_() for k, v in t.items()}


def to_cpu(result):
    y, final, grads = result
    return y.cpu(), final.cpu(), {k: g.cpu() for k, g in grads.items()}


def check_tight(t, chunk_size, msg="", **kw):
    """fp32 kernel vs the float64 reference within fp32's tolerance."""
    y, final, grads = to_cpu(run(mamba_chunk_scan_triton, on_device(t), chunk_size, **kw))
    y_ref, final_ref, grads_ref = run(mamba_chunk_scan_ref, upcast(t), chunk_size, **kw)
    assert y.dtype == f32 and final.dtype == f32
    assert_close(y, y_ref, f32, msg=f"{msg} y")
    assert_close(final, final_ref, f32, msg=f"{msg} final_states")
    for name, g in grads.items():
        assert g.dtype == t[name].dtype and g.shape == t[name].shape, name
        assert_close(g, grads_ref[name], f32, msg=f"{msg} d{name}")


def test_matches_reference():
    """All features: D, z, dt_bias, softplus, initial states; seqlen not a multiple of the chunk,
    ngroups 2 of 4 heads, odd dstate and headdim."""
    check_tight(make_inputs(batch=1, seqlen=37, dtype=f32), 16, dt_softplus=True)


@pytest.mark.parametrize("dtype", [bf16, f16])
def test_low_precision(dtype):
    t = make_inputs(batch=1, seqlen=40, dtype=dtype)
    kw = dict(chunk_size=16, dt_softplus=True)
    y, final, grads = to_cpu(run(mamba_chunk_scan_triton, on_device(t), **kw))
    y_lowp, final_lowp, grads_lowp = run(mamba_chunk_scan_ref, t, **kw)
    y_ref, final_ref, grads_ref = run(mamba_chunk_scan_ref, upcast(t), **kw)
    assert y.dtype == dtype and final.dtype == f32
    assert_close_to_ref(y, y_ref, y_lowp, msg="y")
    assert_close_to_ref(final, final_ref, final_lowp, msg="final_states")
    for name, g in grads.items():
        assert g.dtype == t[name].dtype, name
        assert_close_to_ref(g, grads_ref[name], grads_lowp[name], msg=f"d{name}")


@pytest.mark.parametrize(
    "shape, chunk_size",
    [
        (dict(seqlen=1, batch=1, nheads=2, ngroups=1), 16),
        (dict(seqlen=30, batch=1, nheads=2, ngroups=2, dstate=1, headdim=1), 24),
        (dict(seqlen=20, batch=2, nheads=2, ngroups=1, D_per_channel=True, noncontiguous=True), 16),
        (dict(seqlen=20, batch=1, nheads=2, ngroups=1, optional=False, initial=False), 8),
    ],
    ids=["seqlen1", "dstate1-chunk24", "D-channel-noncontig", "bare-chunk8"],
)
def test_awkward_shapes(shape, chunk_size):
    check_tight(make_inputs(dtype=f32, **shape), chunk_size, msg=str(shape), dt_softplus=True)


def test_seq_idx_and_dt_limit():
    """Packed sequences: boundaries inside chunks, on a chunk boundary (16) and a one-token
    sequence; a second row of one sequence; dt clamped without softplus, negative steps masked."""
    lengths = [5, 11, 1, 7]
    t = make_inputs(batch=2, seqlen=sum(lengths), nheads=2, ngroups=1, dtype=f32)
    with torch.no_grad():
        t["dt"][0, :3] = -0.3
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    seq_idx = torch.stack([seq_idx, torch.full_like(seq_idx, 2)]).int().to(DEVICE)
    check_tight(t, 8, dt_softplus=False, dt_limit=(0.0, 0.4), seq_idx=seq_idx)


@pytest.mark.parametrize("initial", [True, False], ids=["initial_states", "no-initial_states"])
def test_varlen_states(initial):
    """Varlen states and the gradients through them (with y's and the final states'), against the reference:
    a sequence ending in the first chunk, an empty one, one crossing a chunk boundary, one ending on it."""
    t, kw = packed([3, 0, 7, 6], f32, nheads=2, ngroups=1, initial=initial)
    kw = dict(seq_idx=kw["seq_idx"].to(DEVICE), cu_seqlens=kw["cu_seqlens"].to(DEVICE), dt_softplus=True)
    outputs, grads = run_varlen(mamba_chunk_scan_triton, on_device(t), 8, **kw)
    outputs_ref, grads_ref = run_varlen(mamba_chunk_scan_ref, upcast(t), 8, **kw)
    assert outputs[2].dtype == f32 and outputs[2].shape == (4, 2, 6, 5)
    for name, out, ref in zip(("y", "final_states", "varlen_states"), outputs, outputs_ref):
        assert_close(out.cpu(), ref, f32, msg=name)
    for name, g in grads.items():
        assert_close(g.cpu(), grads_ref[name], f32, msg=f"d{name}")


def test_strong_decay_no_nan():
    """Cumulative decay reaching -1000s in one chunk: exp of masked differences stays finite, and
    y and the final states keep fp32's tolerance. The gradients of dt, A and dt_bias are only checked for
    finiteness here: a difference of two cumsums near -3000 carries their rounding (~2e-4), which
    their sums expose (known limit of the prefix-difference form, shared with mamba_ssm)."""
    t = make_inputs(batch=1, seqlen=64, nheads=2, ngroups=1, dtype=f32)
    with torch.no_grad():
        t["A"].fill_(-30.0)
        t["dt"].uniform_(0.5, 3.0)
    y, final, grads = to_cpu(run(mamba_chunk_scan_triton, on_device(t), 64))
    y_ref, final_ref, grads_ref = run(mamba_chunk_scan_ref, upcast(t), 64)
    assert_close(y, y_ref, f32, msg="y")
    assert_close(final, final_ref, f32, msg="final_states")
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        if name not in ("dt", "A", "dt_bias"):
            assert_close(g, grads_ref[name], f32, msg=f"d{name}")


def test_long_range_decay():
    """Moderate decay over a 64-step chunk (cumsum down to about -60): everything within fp32's tolerance."""
    t = make_inputs(batch=1, seqlen=64, nheads=2, ngroups=1, dtype=f32)
    with torch.no_grad():
        t["A"].fill_(-2.0)
        t["dt"].uniform_(0.2, 1.0)
    check_tight(t, 64)


def test_one_output_used():
    """Only the final states used: y's gradient is None in the backward, and vice versa."""
    t = make_inputs(batch=1, seqlen=20, nheads=2, ngroups=1, dtype=f32)
    t_dev, t_ref = on_device(t), upcast(t)
    for used in (0, 1):
        out = mamba_chunk_scan_triton(**t_dev, chunk_size=16, dt_softplus=True, return_final_states=True)[used]
        ref = mamba_chunk_scan_ref(**t_ref, chunk_size=16, dt_softplus=True, return_final_states=True)[used]
        grads = torch.autograd.grad(out.sum(), list(t_dev.values()), allow_unused=True)
        grads_ref = torch.autograd.grad(ref.sum(), list(t_ref.values()), allow_unused=True)
        for name, g, g_ref in zip(t, grads, grads_ref):
            if g_ref is None:  # z and D do not reach the final states
                assert g is None or not g.any(), name
            else:
                assert_close(g.cpu(), g_ref, f32, msg=f"output {used}: d{name}")


def test_public_api_backend():
    """backend="triton" reaches this kernel through mamba_chunk_scan_combined."""
    _backends._probe.cache_clear()  # a probe made before TRITON_INTERPRET was set is stale
    t = {k: v.detach().to(DEVICE) for k, v in make_inputs(batch=1, seqlen=9, nheads=2, ngroups=1, dtype=f32).items()}
    y = mamba_chunk_scan_combined(**t, chunk_size=16, dt_softplus=True, backend="triton")
    assert_close(y.cpu(), mamba_chunk_scan_ref(**{k: v.cpu() for k, v in t.items()}, chunk_size=16, dt_softplus=True))


def test_torch_compile_fullgraph():
    """Forward and backward trace through the two ops in one graph; interpreted, through their fake kernels."""
    t = {k: v.detach().to(DEVICE) for k, v in make_inputs(batch=1, seqlen=20, nheads=2, ngroups=1, dtype=f32).items()}

    def f(x, dt, A, B, C, D, z, dt_bias, initial_states):
        y, final = mamba_chunk_scan_triton(
            x, dt, A, B, C, 8, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            dt_softplus=True, return_final_states=True,
        )
        return y.square().sum() + final.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [v.requires_grad_() for v in t.values()]
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, args)
    loss_eager = f(*args)
    grads_eager = torch.autograd.grad(loss_eager, args)
    assert_close(loss, loss_eager)
    for name, g, g_eager in zip(t, grads, grads_eager):
        assert_close(g, g_eager, msg=name)


@pytest.mark.parametrize("optional", [True, False], ids=["all-inputs", "bare"])
def test_opcheck(optional):
    """Schemas, fake kernels (shapes, dtypes, strides) and dispatch of the two ops, as torch.library checks them."""
    from lnlm_ssm.ops.ssd import triton as ssd_triton

    t = make_inputs(batch=1, seqlen=19, nheads=2, ngroups=1, D_per_channel=True, dtype=f32)
    t = {k: v.detach().to(DEVICE) for k, v in t.items()}
    config = (8, True, -math.inf, math.inf)
    if optional:
        extra = (t["D"], t["z"], t["dt_bias"])
        seq_idx = torch.tensor([[0] * 7 + [1] * 12], device=DEVICE)
        initial_states = t["initial_states"]
    else:
        extra, seq_idx, initial_states = (None, None, None), None, None
    base = (t["x"], t["dt"], t["A"], t["B"], t["C"], *extra)
    fwd_args = (*base, initial_states, seq_idx, *config)
    torch.library.opcheck(ssd_triton._ssd_fwd_op, fwd_args)
    out, out_x, final, *saved = ssd_triton._ssd_fwd_op(*fwd_args)
    grad_final = torch.randn_like(final) if optional else None
    grad_states = torch.randn_like(saved[0]) if optional else None
    bwd_args = (torch.randn_like(out), grad_final, grad_states, *base, seq_idx, out_x, *saved, *config)
    torch.library.opcheck(ssd_triton._ssd_bwd_op, bwd_args)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real speed, big shapes)")


@needs_gpu
def test_gpu_large_bf16_and_compile():
    """The maintainer's target shape (bf16, chunk 256) against the reference, eager and compiled."""
    t = make_inputs(batch=2, seqlen=1024, nheads=8, ngroups=1, headdim=64, dstate=128, dtype=bf16)
    kw = dict(chunk_size=256, dt_softplus=True)
    y, final, grads = run(mamba_chunk_scan_triton, on_device(t), **kw)
    t_cuda = on_device(t)
    y_lowp, final_lowp, grads_lowp = run(mamba_chunk_scan_ref, t_cuda, **kw)
    y_ref, final_ref, grads_ref = run(mamba_chunk_scan_ref, upcast(t_cuda), **kw)
    assert_close_to_ref(y, y_ref, y_lowp, msg="y")
    assert_close_to_ref(final, final_ref, final_lowp, msg="final_states")
    for name in grads:
        assert_close_to_ref(grads[name], grads_ref[name], grads_lowp[name], msg=f"d{name}")
    compiled = torch.compile(mamba_chunk_scan_triton, fullgraph=True)
    y_c = compiled(**{k: v.detach() for k, v in t_cuda.items()}, **kw)
    assert_close(y_c, y.detach(), bf16)


@needs_gpu
def test_gpu_speed_vs_reference():
    """bf16 forward+backward at batch 4, seqlen 4096, 32 heads x 64, dstate 128: faster than the torch reference."""
    import triton.testing

    t = on_device(make_inputs(batch=4, seqlen=4096, nheads=32, ngroups=1, headdim=64, dstate=128, dtype=bf16))

    def step(fn):
        y = fn(**t, chunk_size=256, dt_softplus=True)
        y.sum().backward()

    ours = triton.testing.do_bench(lambda: step(mamba_chunk_scan_triton))
    ref = triton.testing.do_bench(lambda: step(mamba_chunk_scan_ref))
    assert ours < ref, (ours, ref)
