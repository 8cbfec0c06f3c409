"""Chunked SSD reference against the step-by-step recurrence, packing, and gradients."""

import inspect
import math

import pytest
import torch

from lnlm_ssm.ops import mamba_chunk_scan_combined, mamba_chunk_scan_ref, ssd_recurrent_ref
from lnlm_ssm.utils.testing import assert_close

f64 = torch.float64


def make_inputs(batch=2, seqlen=21, nheads=4, headdim=3, ngroups=2, dstate=5, dtype=f64, requires_grad=False, D_per_channel=False):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=f64) * scale).to(dtype).requires_grad_(requires_grad)

    return dict(
        x=r(batch, seqlen, nheads, headdim),
        dt=r(batch, seqlen, nheads, scale=0.5),
        A=(-torch.rand(nheads, dtype=f64) * 2 - 0.1).requires_grad_(requires_grad),
        B=r(batch, seqlen, ngroups, dstate),
        C=r(batch, seqlen, ngroups, dstate),
        D=r(nheads, headdim) if D_per_channel else r(nheads),
        z=r(batch, seqlen, nheads, headdim),
        dt_bias=r(nheads, scale=0.3),
        initial_states=r(batch, nheads, headdim, dstate),
    )


def run_both(t, chunk_size, **kw):
    chunked = mamba_chunk_scan_ref(**t, chunk_size=chunk_size, return_final_states=True, **kw)
    recurrent = ssd_recurrent_ref(**t, return_final_states=True, **kw)
    return chunked, recurrent


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 8, 21, 64])
@pytest.mark.parametrize("D_per_channel", [False, True])
def test_chunked_equals_recurrence(chunk_size, D_per_channel):
    t = make_inputs(D_per_channel=D_per_channel)
    (y, final), (y_rec, final_rec) = run_both(t, chunk_size, dt_softplus=True)
    assert_close(y, y_rec)
    assert_close(final, final_rec)


@pytest.mark.parametrize("dt_limit", [(0.0, math.inf), (0.05, 0.8)])
def test_dt_limit(dt_limit):
    t = make_inputs()
    (y, final), (y_rec, final_rec) = run_both(t, 8, dt_softplus=True, dt_limit=dt_limit)
    assert_close(y, y_rec)
    unclamped = mamba_chunk_scan_ref(**t, chunk_size=8, dt_softplus=True)
    assert torch.equal(y, unclamped) == (dt_limit == (0.0, math.inf))


def test_recurrence_by_hand():
    """One head, one channel, one state: y_t = C_t h_t with h_t = exp(dt A) h_{t-1} + dt B x."""
    x = torch.tensor([1.0, 2.0, -1.0], dtype=f64).view(1, 3, 1, 1)
    dt = torch.tensor([0.5, 1.0, 0.25], dtype=f64).view(1, 3, 1)
    A = torch.tensor([-2.0], dtype=f64)
    B = torch.tensor([1.0, 0.5, 2.0], dtype=f64).view(1, 3, 1, 1)
    C = torch.tensor([3.0, -1.0, 1.0], dtype=f64).view(1, 3, 1, 1)
    h, expected = 0.0, []
    for t in range(3):
        h = math.exp(dt[0, t, 0].item() * -2.0) * h + dt[0, t, 0].item() * B[0, t, 0, 0].item() * x[0, t, 0, 0].item()
        expected.append(C[0, t, 0, 0].item() * h)
    for chunk_size in (1, 2, 3):
        y = mamba_chunk_scan_ref(x, dt, A, B, C, chunk_size)
        assert_close(y.flatten(), torch.tensor(expected, dtype=f64))


@pytest.mark.parametrize("chunk_size", [3, 8, 32])
def test_seq_idx_equals_separate_sequences(chunk_size):
    lengths = [5, 1, 9, 6]
    t = make_inputs(batch=1, seqlen=sum(lengths))
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    y, final = mamba_chunk_scan_ref(**t, chunk_size=chunk_size, dt_softplus=True, seq_idx=seq_idx, return_final_states=True)
    start = 0
    for i, n in enumerate(lengths):
        part = {k: (v[:, start : start + n] if k in ("x", "dt", "B", "C", "z") else v) for k, v in t.items()}
        if i > 0:
            part["initial_states"] = None  # the initial state belongs to the first sequence only
        y_i, final_i = mamba_chunk_scan_ref(**part, chunk_size=chunk_size, dt_softplus=True, return_final_states=True)
        assert_close(y[:, start : start + n], y_i, msg=f"sequence {i}")
        start += n
    assert_close(final, final_i)


def test_seq_idx_recurrent_agrees():
    t = make_inputs(batch=2, seqlen=13)
    seq_idx = torch.tensor([[0] * 4 + [1] * 9, [3] * 6 + [7] * 7])
    (y, final), (y_rec, final_rec) = run_both(t, 4, dt_softplus=True, seq_idx=seq_idx)
    assert_close(y, y_rec)
    assert_close(final, final_rec)


def test_gradients_match_recurrence():
    t = make_inputs(seqlen=9, requires_grad=True)
    seq_idx = torch.tensor([[0] * 3 + [1] * 6, [0] * 9])
    (y, final), (y_rec, final_rec) = run_both(t, 4, dt_softplus=True, seq_idx=seq_idx)
    gy, gf = torch.randn_like(y), torch.randn_like(final)
    inputs = list(t.values())
    grads = torch.autograd.grad((y * gy).sum() + (final * gf).sum(), inputs)
    grads_rec = torch.autograd.grad((y_rec * gy).sum() + (final_rec * gf).sum(), inputs)
    for name, g, g_rec in zip(t, grads, grads_rec):
        assert_close(g, g_rec, msg=name)


def test_gradcheck_chunked():
    t = make_inputs(batch=1, seqlen=5, nheads=2, headdim=2, ngroups=1, dstate=2, requires_grad=True)
    names = list(t)

    def f(*args):
        return mamba_chunk_scan_ref(**dict(zip(names, args)), chunk_size=2, dt_softplus=True, return_final_states=True)

    assert torch.autograd.gradcheck(f, tuple(t.values()))


def test_long_strong_decay_has_no_nans():
    """Large cumulative decay inside a chunk must not produce inf - inf (the naive segsum pitfall)."""
    t = make_inputs(batch=1, seqlen=256, dtype=torch.float32, requires_grad=True)
    with torch.no_grad():
        t["A"].fill_(-50.0)
        t["dt"].fill_(3.0)
    y, final = mamba_chunk_scan_combined(**t, chunk_size=256, dt_softplus=True, return_final_states=True)
    (y.sum() + final.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    assert all(torch.isfinite(v.grad).all() for v in t.values())


def test_low_precision_output_dtype():
    t = make_inputs(dtype=torch.float16)
    for k in ("A", "D", "dt_bias", "initial_states"):
        t[k] = t[k].float()
    y, final = mamba_chunk_scan_combined(**t, chunk_size=8, dt_softplus=True, return_final_states=True)
    assert y.dtype == torch.float16 and final.dtype == torch.float32
    y64 = mamba_chunk_scan_ref(**{k: v.double() for k, v in t.items()}, chunk_size=8, dt_softplus=True)
    assert_close(y, y64, torch.float16)


def test_signature_is_mamba_ssm_order():
    """mamba_ssm's parameters, order and defaults; ours (state_dtype, backend) after them, keyword-only."""
    params = inspect.signature(mamba_chunk_scan_combined).parameters
    incumbent = [
        ("x", inspect.Parameter.empty), ("dt", inspect.Parameter.empty), ("A", inspect.Parameter.empty),
        ("B", inspect.Parameter.empty), ("C", inspect.Parameter.empty), ("chunk_size", inspect.Parameter.empty),
        ("D", None), ("z", None), ("dt_bias", None), ("initial_states", None), ("seq_idx", None),
        ("cu_seqlens", None), ("dt_softplus", False), ("dt_limit", (0.0, math.inf)), ("return_final_states", False),
        ("return_varlen_states", False),
    ]
    positional = [(name, p.default) for name, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == incumbent
    keyword_only = {name: p.default for name, p in params.items() if p.kind == p.KEYWORD_ONLY}
    assert keyword_only == {"state_dtype": None, "backend": "auto"}
    ref_params = inspect.signature(mamba_chunk_scan_ref).parameters
    assert list(ref_params) == [name for name in params if name != "backend"]


def test_positional_call():
    """The 13th positional argument is dt_softplus (cu_seqlens comes before it), the 16th return_varlen_states."""
    t = make_inputs(batch=1, seqlen=10)
    args = [t[k] for k in ("x", "dt", "A", "B", "C")]
    y = mamba_chunk_scan_combined(*args, 16, None, None, None, None, None, None, True)
    assert_close(y, mamba_chunk_scan_combined(*args, 16, dt_softplus=True))
    assert not torch.equal(y, mamba_chunk_scan_combined(*args, 16))
    cu_seqlens = torch.tensor([0, 10])
    y, final, varlen = mamba_chunk_scan_combined(
        *args, 4, t["D"], t["z"], t["dt_bias"], t["initial_states"], None, cu_seqlens, True, (0.0, 0.5), True, True
    )
    y_kw, final_kw = mamba_chunk_scan_combined(
        *args, 4, D=t["D"], z=t["z"], dt_bias=t["dt_bias"], initial_states=t["initial_states"], dt_softplus=True,
        dt_limit=(0.0, 0.5), return_final_states=True,
    )
    assert_close(y, y_kw)
    assert_close(final, final_kw)
    assert_close(varlen, final_kw)


PACKINGS = {
    "inside-chunks": [5, 1, 9, 6],
    "on-chunk-boundaries": [8, 8, 3],
    "empty-sequences": [0, 7, 0, 6, 0],
    "one-sequence": [13],
}


def packed(lengths, **kw):
    """Inputs of one row holding sequences of ``lengths``; seq_idx and cu_seqlens marking them."""
    t = make_inputs(batch=1, seqlen=sum(lengths), **kw)
    lengths = torch.tensor(lengths)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None].int()
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    return t, seq_idx, cu_seqlens


def per_sequence_final_states(t, cu_seqlens, **kw):
    """Each sequence alone through the step-by-step recurrence; the initial states are the first token's
    sequence's; an empty sequence's state is zero."""
    states = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        part = {k: (v[:, start:end] if k in ("x", "dt", "B", "C", "z") else v) for k, v in t.items()}
        if start > 0 and "initial_states" in part:
            part["initial_states"] = None
        _, final = ssd_recurrent_ref(**part, return_final_states=True, **kw)
        states.append(final[0] if end > start else torch.zeros_like(final[0]))
    return torch.stack(states)


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("initial", [True, False], ids=["initial_states", "no-initial_states"])
@pytest.mark.parametrize("chunk_size", [4, 8])
def test_varlen_states_are_each_sequence_alone(packing, initial, chunk_size):
    t, seq_idx, cu_seqlens = packed(PACKINGS[packing])
    if not initial:
        del t["initial_states"]
    kw = dict(dt_softplus=True, dt_limit=(0.0, 2.0))
    y, final, varlen = mamba_chunk_scan_ref(
        **t, chunk_size=chunk_size, seq_idx=seq_idx, cu_seqlens=cu_seqlens, return_final_states=True,
        return_varlen_states=True, **kw
    )
    expected = per_sequence_final_states(t, cu_seqlens, **kw)
    assert varlen.shape == (len(cu_seqlens) - 1, 4, 3, 5)
    assert_close(varlen, expected)
    assert_close(y, mamba_chunk_scan_ref(**t, chunk_size=chunk_size, seq_idx=seq_idx, **kw))
    assert_close(final, mamba_chunk_scan_ref(**t, chunk_size=chunk_size, seq_idx=seq_idx, return_final_states=True, **kw)[1])


def test_varlen_states_gradients_match_recurrence():
    t, seq_idx, cu_seqlens = packed([3, 4, 2], requires_grad=True)
    _, varlen = mamba_chunk_scan_ref(
        **t, chunk_size=4, seq_idx=seq_idx, cu_seqlens=cu_seqlens, dt_softplus=True, return_varlen_states=True
    )
    expected = per_sequence_final_states(t, cu_seqlens, dt_softplus=True)
    weights = torch.randn_like(varlen)
    inputs = [t[k] for k in ("x", "dt", "A", "B", "dt_bias", "initial_states")]
    grads = torch.autograd.grad((varlen * weights).sum(), inputs)
    grads_rec = torch.autograd.grad((expected * weights).sum(), inputs)
    for name, g, g_rec in zip(("x", "dt", "A", "B", "dt_bias", "initial_states"), grads, grads_rec):
        assert g.abs().sum() > 0, name
        assert_close(g, g_rec, msg=name)


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16, torch.float64])
def test_state_dtype(state_dtype):
    """By default (mamba_ssm's dtypes) final states in the math dtype and varlen states in C's; else both in
    state_dtype, rounded from the same values."""
    t, seq_idx, cu_seqlens = packed([6, 4], dtype=torch.float16)
    for k in ("A", "D", "dt_bias", "initial_states"):
        t[k] = t[k].float()
    kw = dict(chunk_size=4, seq_idx=seq_idx, cu_seqlens=cu_seqlens, dt_softplus=True, return_final_states=True,
              return_varlen_states=True, backend="reference")
    y, final, varlen = mamba_chunk_scan_combined(**t, **kw, state_dtype=state_dtype)
    y32, final32, varlen32 = mamba_chunk_scan_combined(**t, **kw, state_dtype=torch.float32)
    assert y.dtype == torch.float16 and torch.equal(y, y32)
    assert final32.dtype == varlen32.dtype == torch.float32
    assert final.dtype == (state_dtype or torch.float32)
    assert varlen.dtype == (state_dtype or torch.float16)
    assert torch.equal(final, final32.to(final.dtype))
    assert torch.equal(varlen, varlen32.to(varlen.dtype))


def test_cu_seqlens_unused_without_varlen_states():
    """As in mamba_ssm, cu_seqlens is only read for the varlen states: batch 2 and no check of its values."""
    t = make_inputs(batch=2, seqlen=6)
    y = mamba_chunk_scan_combined(**t, chunk_size=4, cu_seqlens=torch.tensor([3, 1]), dt_softplus=True)
    assert torch.equal(y, mamba_chunk_scan_combined(**t, chunk_size=4, dt_softplus=True))
