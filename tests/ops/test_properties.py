"""Property tests over random shapes: seqlen 1, odd sizes, dstate 1..64, groups, non-contiguous inputs."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from lnlm_ssm.ops import (
    causal_conv1d_fn,
    mamba_chunk_scan_combined,
    selective_scan_fn,
    selective_state_update,
    ssd_recurrent_ref,
)
from lnlm_ssm.utils.testing import assert_close

f64 = torch.float64


def tensor(draw, shape, noncontiguous, scale=1.0):
    """A float64 tensor of ``shape``, laid out non-contiguously when asked (reversed-stride storage)."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if noncontiguous and len(shape) > 1:
        t = torch.randn(*reversed(shape), generator=g, dtype=f64).permute(*reversed(range(len(shape))))
    else:
        t = torch.randn(*shape, generator=g, dtype=f64)
    return t * scale


@st.composite
def scan_case(draw):
    ngroups = draw(st.sampled_from([None, 1, 2, 3]))
    per_group = draw(st.integers(1, 4))
    dim = per_group * (ngroups or draw(st.integers(1, 3)))
    batch, seqlen, dstate = draw(st.integers(1, 3)), draw(st.integers(1, 33)), draw(st.integers(1, 64))
    nc = draw(st.booleans())
    bc = (batch, dstate, seqlen) if ngroups is None else (batch, ngroups, dstate, seqlen)
    return dict(
        u=tensor(draw, (batch, dim, seqlen), nc),
        delta=tensor(draw, (batch, dim, seqlen), nc, 0.5),
        A=-tensor(draw, (dim, dstate), nc).abs(),
        B=tensor(draw, bc, nc),
        C=tensor(draw, bc, nc),
        D=tensor(draw, (dim,), nc),
        z=tensor(draw, (batch, dim, seqlen), nc),
        delta_bias=tensor(draw, (dim,), nc, 0.3),
        initial_state=tensor(draw, (batch, dim, dstate), nc),
    ), draw(st.integers(0, seqlen))


@given(scan_case())
def test_selective_scan_split_and_layout(case):
    t, split = case
    y, last = selective_scan_fn(**t, delta_softplus=True, return_last_state=True)
    contiguous = {k: v.contiguous() for k, v in t.items()}
    y_c, last_c = selective_scan_fn(**contiguous, delta_softplus=True, return_last_state=True)
    assert_close(y, y_c)
    assert_close(last, last_c)

    def part(sl, initial_state):
        p = {k: (v[..., sl] if k in ("u", "delta", "z", "B", "C") else v) for k, v in t.items()}
        return selective_scan_fn(**{**p, "initial_state": initial_state}, delta_softplus=True, return_last_state=True)

    y1, mid = part(slice(0, split), t["initial_state"])
    y2, last2 = part(slice(split, None), mid)
    assert_close(torch.cat([y1, y2], -1), y)
    assert_close(last2, last)


@st.composite
def ssd_case(draw):
    ngroups = draw(st.integers(1, 3))
    nheads = ngroups * draw(st.integers(1, 2))
    batch, seqlen = draw(st.integers(1, 2)), draw(st.integers(1, 40))
    headdim, dstate = draw(st.integers(1, 5)), draw(st.integers(1, 64))
    nc = draw(st.booleans())
    boundaries = sorted(draw(st.lists(st.integers(1, max(1, seqlen - 1)), max_size=3)))
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.long)
    for b in boundaries:
        seq_idx[:, b:] += 1
    return dict(
        x=tensor(draw, (batch, seqlen, nheads, headdim), nc),
        dt=tensor(draw, (batch, seqlen, nheads), nc, 0.5),
        A=-tensor(draw, (nheads,), nc).abs(),
        B=tensor(draw, (batch, seqlen, ngroups, dstate), nc),
        C=tensor(draw, (batch, seqlen, ngroups, dstate), nc),
        D=tensor(draw, (nheads, headdim) if draw(st.booleans()) else (nheads,), nc),
        z=tensor(draw, (batch, seqlen, nheads, headdim), nc),
        dt_bias=tensor(draw, (nheads,), nc, 0.3),
        initial_states=tensor(draw, (batch, nheads, headdim, dstate), nc),
        seq_idx=seq_idx if boundaries else None,
    ), draw(st.integers(1, 48))


@given(ssd_case())
def test_ssd_chunked_equals_recurrence(case):
    t, chunk_size = case
    y, final = mamba_chunk_scan_combined(**t, chunk_size=chunk_size, dt_softplus=True, return_final_states=True)
    y_rec, final_rec = ssd_recurrent_ref(**t, dt_softplus=True, return_final_states=True)
    assert_close(y, y_rec)
    assert_close(final, final_rec)


@given(ssd_case())
def test_state_update_equals_first_scan_step(case):
    t, _ = case
    first = {k: (v[:, :1] if k in ("x", "dt", "B", "C", "z") else v) for k, v in t.items() if k != "seq_idx"}
    y_scan, state_scan = ssd_recurrent_ref(**first, dt_softplus=True, return_final_states=True)
    state = t["initial_states"].clone()
    y = selective_state_update(
        state, t["x"][:, 0], t["dt"][:, 0], t["A"], t["B"][:, 0], t["C"][:, 0], t["D"], t["z"][:, 0], t["dt_bias"], True
    )
    assert_close(y, y_scan[:, 0])
    assert_close(state, state_scan)


@given(st.data())
def test_conv1d_split(data):
    batch, dim, seqlen = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 7)), data.draw(st.integers(1, 20))
    width = data.draw(st.integers(2, 4))
    nc = data.draw(st.booleans())
    x = tensor(data.draw, (batch, dim, seqlen), nc)
    weight, bias = tensor(data.draw, (dim, width), nc), tensor(data.draw, (dim,), nc)
    split = data.draw(st.integers(0, seqlen))
    full, final = causal_conv1d_fn(x, weight, bias, return_final_states=True, activation="silu")
    y1, mid = causal_conv1d_fn(x[..., :split], weight, bias, return_final_states=True, activation="silu")
    y2, final2 = causal_conv1d_fn(x[..., split:], weight, bias, initial_states=mid, return_final_states=True, activation="silu")
    assert_close(torch.cat([y1, y2], -1), full)
    assert_close(final2, final)
