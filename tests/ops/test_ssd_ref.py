"""Chunked SSD reference against the step-by-step recurrence, packing, and gradients."""

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
