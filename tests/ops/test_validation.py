"""Bad input raises ValueError/TypeError naming the argument, at the public boundary."""

import math

import pytest
import torch

from lnlm_ssm.ops import (
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    rms_norm_fn,
    selective_scan_fn,
    selective_state_update,
)


def scan_args(**override):
    b, d, l, n = 2, 4, 5, 3
    args = dict(
        u=torch.randn(b, d, l), delta=torch.rand(b, d, l), A=-torch.rand(d, n),
        B=torch.randn(b, n, l), C=torch.randn(b, n, l), D=torch.randn(d), z=torch.randn(b, d, l),
        delta_bias=torch.randn(d), initial_state=torch.randn(b, d, n),
    )
    args.update(override)
    return args


def ssd_args(**override):
    b, l, h, p, g, n = 2, 6, 4, 2, 2, 3
    args = dict(
        x=torch.randn(b, l, h, p), dt=torch.rand(b, l, h), A=-torch.rand(h),
        B=torch.randn(b, l, g, n), C=torch.randn(b, l, g, n), chunk_size=4, D=torch.randn(h),
        z=torch.randn(b, l, h, p), dt_bias=torch.randn(h), initial_states=torch.randn(b, h, p, n),
        seq_idx=torch.zeros(b, l, dtype=torch.int32),
    )
    args.update(override)
    return args


SCAN_CASES = [
    (dict(u=torch.randn(2, 4)), ValueError, r"u must have 3 dimensions \(batch, dim, seqlen\)"),
    (dict(delta=torch.rand(2, 4, 6)), ValueError, r"delta has shape \(2, 4, 6\).*seqlen = 5 \(from u\)"),
    (dict(A=-torch.rand(5, 3)), ValueError, r"A has shape \(5, 3\).*dim = 4 \(from u\)"),
    (dict(B=torch.randn(2, 3, 3, 5), C=torch.randn(2, 3, 3, 5)), ValueError, r"dim \(4\) must be divisible by ngroups \(3\)"),
    (dict(C=torch.randn(2, 2, 3, 5)), ValueError, r"B and C must have the same number of groups"),
    (dict(B=torch.randn(5, 3)), ValueError, r"B has shape \(5, 3\).*dim = 4 \(from u\)"),
    (dict(B=torch.randn(3)), ValueError, r"B must have 2 dimensions \(dim, dstate\), 3 .* or 4"),
    (dict(B=torch.randn(4, 3, dtype=torch.complex64)), TypeError, r"B must be real when A is real"),
    (dict(B=torch.randn(2, 3, 5, dtype=torch.complex64)), TypeError, r"B must be real when time-varying"),
    (dict(A=torch.randn(4, 3, dtype=torch.complex64), initial_state=None), ValueError,
     r"B must have 2 \* seqlen = 10 entries in its last dimension when A is complex"),
    (dict(A=torch.randn(4, 3, dtype=torch.complex64), B=torch.randn(4, 3), initial_state=None), TypeError,
     r"B must be complex \(dim, dstate\) when A is complex, got torch.float32"),
    (dict(A=torch.randn(4, 3, dtype=torch.complex64), B=torch.randn(2, 3, 10), C=torch.randn(2, 3, 10)), TypeError,
     r"initial_state must be complex \(batch, dim, dstate\) when A is complex"),
    (dict(A=torch.randn(4, 3, dtype=torch.complex32)), TypeError, r"A must have dtype complex64 or complex128"),
    (dict(D=torch.randn(3)), ValueError, r"D has shape \(3,\)"),
    (dict(initial_state=torch.randn(2, 4, 2)), ValueError, r"initial_state has shape \(2, 4, 2\).*dstate = 3"),
    (dict(u=torch.randint(0, 3, (2, 4, 5))), TypeError, r"u must have dtype float32, float64, bfloat16 or float16, got torch.int64"),
    (dict(delta=torch.rand(2, 4, 5, dtype=torch.float64)), TypeError, r"delta must have the dtype of u"),
    (dict(C=torch.randn(2, 3, 5, dtype=torch.float64)), TypeError, r"C must have the dtype of B"),
    (dict(u=[[1.0]]), TypeError, r"u must be a torch.Tensor, got list"),
    (dict(u=torch.randn(2, 4, 5, device="meta")), ValueError, r"delta is on cpu, but u is on meta"),
]


@pytest.mark.parametrize("override,error,pattern", SCAN_CASES)
def test_selective_scan_errors(override, error, pattern):
    with pytest.raises(error, match=pattern):
        selective_scan_fn(**scan_args(**override))


SSD_CASES = [
    (dict(x=torch.randn(2, 6, 4)), ValueError, r"x must have 4 dimensions"),
    (dict(dt=torch.rand(2, 6, 3)), ValueError, r"dt has shape \(2, 6, 3\).*nheads = 4"),
    (dict(B=torch.randn(2, 6, 3, 3), C=torch.randn(2, 6, 3, 3)), ValueError, r"nheads \(4\) must be divisible by ngroups \(3\)"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be a positive integer, got 0"),
    (dict(chunk_size=2.0), ValueError, r"chunk_size must be a positive int"),
    (dict(D=torch.randn(4, 3)), ValueError, r"D has shape \(4, 3\).*headdim = 2"),
    (dict(seq_idx=torch.zeros(2, 6)), TypeError, r"seq_idx must have an integer dtype, got torch.float32"),
    (dict(seq_idx=torch.tensor([[0, 0, 1, 1, 0, 0], [0] * 6])), ValueError, r"seq_idx must be non-decreasing"),
    (dict(seq_idx=torch.zeros(2, 5, dtype=torch.long)), ValueError, r"seq_idx has shape \(2, 5\)"),
    (dict(initial_states=torch.randn(2, 4, 2, 4)), ValueError, r"initial_states has shape"),
    (dict(dt_limit=(1.0, 0.5)), ValueError, r"dt_limit must satisfy min <= max"),
    (dict(dt_limit="fast"), ValueError, r"dt_limit must be a pair of floats"),
    (dict(z=torch.randn(2, 6, 4, 2, dtype=torch.float64)), TypeError, r"z must have the dtype of x"),
]


@pytest.mark.parametrize("override,error,pattern", SSD_CASES)
def test_ssd_errors(override, error, pattern):
    with pytest.raises(error, match=pattern):
        mamba_chunk_scan_combined(**ssd_args(**override))


def test_conv1d_errors():
    x, w = torch.randn(2, 4, 5), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"weight has shape \(3, 3\).*dim = 4 \(from x\)"):
        causal_conv1d_fn(x, torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"activation must be one of \(None, 'silu', 'swish'\), got 'relu'"):
        causal_conv1d_fn(x, w, activation="relu")
    with pytest.raises(ValueError, match=r"initial_states must have size 2 in dimension 2"):
        causal_conv1d_fn(x, w, initial_states=torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match=r"final_states_out is only written with return_final_states=True"):
        causal_conv1d_fn(x, w, final_states_out=torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match=r"seq_idx must be non-decreasing"):
        causal_conv1d_fn(x, w, seq_idx=torch.tensor([[0, 1, 0, 1, 1]] * 2))
    with pytest.raises(ValueError, match=r"conv_state must hold at least width - 1 = 2 steps"):
        causal_conv1d_update(torch.randn(2, 4), torch.zeros(2, 4, 1), w)
    with pytest.raises(ValueError, match=r"conv_state has shape \(3, 4, 2\).*batch = 2"):
        causal_conv1d_update(torch.randn(2, 4), torch.zeros(3, 4, 2), w)


def test_state_update_errors():
    state, x = torch.zeros(2, 4, 3), torch.randn(2, 4)
    good = dict(dt=torch.rand(2, 4), A=-torch.rand(4, 3), B=torch.randn(2, 3), C=torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"state must have 3 dimensions \(batch, dim, dstate\) or 4"):
        selective_state_update(torch.zeros(2, 4), x, **good)
    with pytest.raises(ValueError, match=r"x has shape \(2, 5\).*dim = 4 \(from state\)"):
        selective_state_update(state, torch.randn(2, 5), **good)
    with pytest.raises(ValueError, match=r"A has shape \(4, 2\).*dstate = 3 \(from state\)"):
        selective_state_update(state, x, **{**good, "A": -torch.rand(4, 2)})
    with pytest.raises(ValueError, match=r"nheads \(4\) must be divisible by ngroups \(3\)"):
        selective_state_update(torch.zeros(2, 4, 2, 3), torch.randn(2, 4, 2), torch.rand(2, 4), -torch.rand(4), torch.randn(2, 3, 3), torch.randn(2, 3, 3))
    with pytest.raises(TypeError, match=r"state must be a torch.Tensor"):
        selective_state_update(None, x, **good)


def test_norm_errors():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"weight has shape \(6,\).*hidden = 8 \(from x\)"):
        rms_norm_fn(x, torch.ones(6))
    with pytest.raises(ValueError, match=r"hidden \(8\) must be divisible by group_size \(3\)"):
        rms_norm_fn(x, torch.ones(8), group_size=3)
    with pytest.raises(ValueError, match=r"residual has shape \(3, 7\)"):
        rms_norm_fn(x, torch.ones(8), residual=torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"eps must be positive"):
        rms_norm_fn(x, torch.ones(8), eps=0.0)


def test_valid_arguments_pass():
    """The argument sets above are valid before each override: the errors come from the override alone."""
    selective_scan_fn(**scan_args())
    mamba_chunk_scan_combined(**ssd_args(), dt_limit=(0.0, math.inf))
