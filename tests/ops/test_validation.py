"""Bad input raises ValueError/TypeError naming the argument, at the public boundary."""

import math

import pytest
import torch

from lnlm_ssm.ops import (
    causal_conv1d_fn,
    causal_conv1d_update,
    causal_conv1d_varlen_states,
    mamba_chunk_scan_combined,
    layer_norm_fn,
    layernorm_fn,
    rms_norm_fn,
    rmsnorm_fn,
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


def varlen_args(**override):
    """ssd_args of one row holding two sequences (4 + 2 tokens), asking for their varlen states."""
    args = ssd_args()
    for k in ("x", "dt", "B", "C", "z", "initial_states"):
        args[k] = args[k][:1]
    args.update(
        seq_idx=torch.tensor([[0, 0, 0, 0, 1, 1]], dtype=torch.int32),
        cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32),
        return_varlen_states=True,
    )
    args.update(override)
    return args


VARLEN_CASES = [
    (dict(cu_seqlens=None), ValueError, r"return_varlen_states=True needs cu_seqlens \(num_seqs \+ 1,\)"),
    (dict(cu_seqlens=torch.tensor([0.0, 4.0, 6.0])), TypeError, r"cu_seqlens must have an integer dtype, got torch.float32"),
    (dict(cu_seqlens=torch.tensor([[0, 4, 6]])), ValueError, r"cu_seqlens must have 1 dimensions \(num_seqs \+ 1\)"),
    (dict(cu_seqlens=torch.tensor([6])), ValueError, r"cu_seqlens must hold num_seqs \+ 1 >= 2 offsets, got \[6\]"),
    (dict(cu_seqlens=torch.tensor([1, 4, 6])), ValueError, r"cu_seqlens must start at 0, got 1"),
    (dict(cu_seqlens=torch.tensor([0, 4, 5])), ValueError, r"cu_seqlens must end at seqlen \(6\), got 5"),
    (dict(cu_seqlens=torch.tensor([0, 4, 2, 6])), ValueError, r"cu_seqlens must be non-decreasing, got 4 then 2 at index 2"),
    (dict(cu_seqlens=torch.tensor([0, 4, 6], device="meta")), ValueError, r"cu_seqlens is on meta, but x is on cpu"),
    (dict(cu_seqlens=torch.tensor([0, 3, 6])), ValueError, r"seq_idx marking the sequences of cu_seqlens.*disagree at token 3"),
    (dict(seq_idx=None), ValueError, r"seq_idx marking the sequences of cu_seqlens.*but seq_idx is None"),
    (dict(state_dtype=torch.int32), TypeError, r"state_dtype must be None or one of \(torch.float32.*got torch.int32"),
]


@pytest.mark.parametrize("override,error,pattern", VARLEN_CASES)
def test_ssd_varlen_errors(override, error, pattern):
    with pytest.raises(error, match=pattern):
        mamba_chunk_scan_combined(**varlen_args(**override))


def test_ssd_varlen_needs_batch_1():
    with pytest.raises(ValueError, match=r"return_varlen_states=True needs batch 1 .*got batch 2"):
        mamba_chunk_scan_combined(**ssd_args(cu_seqlens=torch.tensor([0, 6]), return_varlen_states=True))


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


def conv_update_args(**override):
    args = dict(
        x=torch.randn(2, 4, 3), conv_state=torch.zeros(3, 4, 2), weight=torch.randn(4, 3),
        cache_seqlens=torch.tensor([0, 5], dtype=torch.int32), conv_state_indices=torch.tensor([2, -1]),
    )
    args.update(override)
    return args


def conv_seq_idx(*rows):
    return torch.tensor(rows, dtype=torch.int32)


CONV_PADDING_CASES = [
    (dict(seq_idx=conv_seq_idx([0, 1, -1, 0, 1], [0] * 5)), r"seq_idx must be non-decreasing along seqlen apart from padding \(negative ids\).*got 0 at index \(0, 3\)"),
    (dict(seq_idx=conv_seq_idx([0, 0, 1, 1, -1], [0] * 5), initial_states=torch.randn(2, 4, 2)), r"seq_idx must not mark padding \(negative ids\) together with initial_states or return_final_states.*got -1 at index \(0, 4\)"),
    (dict(seq_idx=conv_seq_idx([0] * 5, [-2, 0, 0, 0, 0]), return_final_states=True), r"seq_idx must not mark padding.*got -2 at index \(1, 0\)"),
]


@pytest.mark.parametrize("override,pattern", CONV_PADDING_CASES)
def test_conv1d_seq_idx_errors(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        causal_conv1d_fn(torch.randn(2, 4, 5), torch.randn(4, 3), **override)


def test_conv1d_accepts_causal_conv1ds_padding():
    """Negative ids anywhere, any negative value, ids rising across them; with states when nothing is padding."""
    x, w = torch.randn(2, 4, 6), torch.randn(4, 3)
    causal_conv1d_fn(x, w, seq_idx=conv_seq_idx([-1, 0, -1, 0, 1, -5], [3, 3, -1, -1, 4, 7]))
    causal_conv1d_fn(x, w, seq_idx=conv_seq_idx([0, 0, 1, 1, 2, 2], [5] * 6), initial_states=torch.randn(2, 4, 2), return_final_states=True)


CONV_UPDATE_CASES = [
    (dict(cache_seqlens=torch.tensor([0.0, 5.0])), TypeError, r"cache_seqlens must have an integer dtype, got torch.float32"),
    (dict(cache_seqlens=torch.tensor([0, 5], dtype=torch.int16)), TypeError, r"cache_seqlens must have dtype int32 or int64, got torch.int16"),
    (dict(cache_seqlens=torch.tensor([0, 5, 1])), ValueError, r"cache_seqlens has shape \(3,\) \(batch\), but batch = 2 \(from x\)"),
    (dict(cache_seqlens=torch.tensor([[0, 5]])), ValueError, r"cache_seqlens must have 1 dimensions \(batch\)"),
    (dict(cache_seqlens=torch.tensor([0, -2])), ValueError, r"cache_seqlens must be >= 0, got -2 at index 1"),
    (dict(conv_state_indices=torch.tensor([2.0, 0.0])), TypeError, r"conv_state_indices must have an integer dtype"),
    (dict(conv_state_indices=torch.tensor([2, 0], dtype=torch.uint8)), TypeError, r"conv_state_indices must have dtype int32 or int64, got torch.uint8"),
    (dict(conv_state_indices=torch.tensor([2])), ValueError, r"conv_state_indices has shape \(1,\) \(batch\), but batch = 2"),
    (dict(conv_state_indices=torch.tensor([-1, 3])), ValueError, r"conv_state_indices must be < the pool size conv_state.shape\[0\] = 3 \(negative: padding\), got 3 at index 1"),
    (dict(conv_state_indices=torch.tensor([1, 1], dtype=torch.int32)), ValueError, r"conv_state_indices must not repeat a slot \(two rows would update the same state\), got 1$"),
    (dict(conv_state=torch.zeros(3, 5, 2)), ValueError, r"conv_state has shape \(3, 5, 2\).*dim = 4 \(from x\)"),
    (dict(conv_state=torch.zeros(3, 4, 1)), ValueError, r"conv_state must hold at least width - 1 = 2 steps"),
    (dict(conv_state=torch.zeros(3, 4, 2), conv_state_indices=None), ValueError, r"conv_state has shape \(3, 4, 2\).*batch = 2 \(from x\)"),
]


@pytest.mark.parametrize("override,error,pattern", CONV_UPDATE_CASES)
def test_conv1d_update_index_errors(override, error, pattern):
    with pytest.raises(error, match=pattern):
        causal_conv1d_update(**conv_update_args(**override))


def test_conv1d_update_accepts_padding_rows_and_a_larger_pool():
    args = conv_update_args(conv_state_indices=torch.tensor([-1, -7]), conv_state=torch.zeros(1, 4, 2))
    assert torch.equal(causal_conv1d_update(**args), torch.zeros(2, 4, 3))


VARLEN_CASES = [
    (dict(x=torch.randn(5, 4, 1)), ValueError, r"x must have 2 dimensions \(total_tokens, dim\)"),
    (dict(cu_seqlens=torch.tensor([0.0, 5.0])), TypeError, r"cu_seqlens must have an integer dtype"),
    (dict(cu_seqlens=torch.tensor([0, 5], dtype=torch.int8)), TypeError, r"cu_seqlens must have dtype int32 or int64"),
    (dict(cu_seqlens=torch.tensor([[0, 5]])), ValueError, r"cu_seqlens must have 1 dimensions \(batch \+ 1\)"),
    (dict(cu_seqlens=torch.tensor([], dtype=torch.int32)), ValueError, r"cu_seqlens must hold at least one offset"),
    (dict(cu_seqlens=torch.tensor([0, 3, 2, 5])), ValueError, r"cu_seqlens must be non-decreasing \(offsets of sequences\), got 2 at index 2"),
    (dict(cu_seqlens=torch.tensor([0, 6])), ValueError, r"cu_seqlens must lie in \[0, total_tokens = 5\], got 6 at index 1"),
    (dict(cu_seqlens=torch.tensor([-1, 5])), ValueError, r"cu_seqlens must lie in \[0, total_tokens = 5\], got -1 at index 0"),
    (dict(state_len=-1), ValueError, r"state_len must be an integer >= 0, got -1"),
    (dict(state_len=2.0), ValueError, r"state_len must be an integer >= 0, got 2.0"),
]


@pytest.mark.parametrize("override,error,pattern", VARLEN_CASES)
def test_conv1d_varlen_states_errors(override, error, pattern):
    args = dict(x=torch.randn(5, 4), cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32), state_len=3)
    args.update(override)
    with pytest.raises(error, match=pattern):
        causal_conv1d_varlen_states(**args)


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


@pytest.mark.parametrize(
    "indices, error, message",
    [
        (torch.tensor([0.0, 1.0]), TypeError, r"state_batch_indices must have an integer dtype, got torch.float32"),
        (torch.tensor([0, 1], dtype=torch.int16), TypeError, r"state_batch_indices must have dtype int32 or int64"),
        (torch.tensor([0, 1, 2]), ValueError, r"state_batch_indices has shape \(3,\) \(batch\), but batch = 2"),
        (torch.tensor([[0, 1]]), ValueError, r"state_batch_indices must have 1 dimensions \(batch\)"),
        (torch.tensor([0, 5]), ValueError, r"state_batch_indices must be slots in \[0, pool=5\).*got 5"),
        (torch.tensor([3, 3]), ValueError, r"state_batch_indices must not repeat a slot.*got 3 more than once"),
        (torch.tensor([0, 1], device="meta"), ValueError, r"state_batch_indices is on meta, but state is on cpu"),
    ],
    ids=["float", "int16", "batch", "ndim", "past_pool", "repeated", "device"],
)
def test_state_update_index_errors(indices, error, message):
    pool, x = torch.zeros(5, 4, 3), torch.randn(2, 4)
    good = dict(dt=torch.rand(2, 4), A=-torch.rand(4, 3), B=torch.randn(2, 3), C=torch.randn(2, 3))
    with pytest.raises(error, match=message):
        selective_state_update(pool, x, **good, state_batch_indices=indices)


def test_state_update_pool_needs_indices():
    pool, x = torch.zeros(5, 4, 3), torch.randn(2, 4)
    good = dict(dt=torch.rand(2, 4), A=-torch.rand(4, 3), B=torch.randn(2, 3), C=torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"x has shape \(2, 4\).*batch = 5 \(from state\)"):
        selective_state_update(pool, x, **good)
    # Repeated padding is fine: only slots must be distinct.
    y = selective_state_update(pool, x, **good, state_batch_indices=torch.tensor([-1, -1]))
    assert torch.equal(y, torch.zeros_like(y))


def test_norm_errors():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"weight has shape \(6,\).*hidden = 8 \(from x\)"):
        rms_norm_fn(x, torch.ones(6), None)
    with pytest.raises(ValueError, match=r"hidden \(8\) must be divisible by group_size \(3\)"):
        rmsnorm_fn(x, torch.ones(8), None, group_size=3)
    with pytest.raises(ValueError, match=r"residual has shape \(3, 7\)"):
        rms_norm_fn(x, torch.ones(8), None, residual=torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"x1 has shape \(3, 7\)"):
        layer_norm_fn(x, torch.ones(8), None, x1=torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"weight1 has shape \(7,\).*hidden = 8"):
        layer_norm_fn(x, torch.ones(8), None, weight1=torch.ones(7))
    with pytest.raises(ValueError, match=r"bias1 was given without weight1"):
        layer_norm_fn(x, torch.ones(8), None, bias1=torch.ones(8))
    with pytest.raises(ValueError, match=r"z has shape \(3, 7\)"):
        layernorm_fn(x, torch.ones(8), None, z=torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"eps must be positive"):
        rms_norm_fn(x, torch.ones(8), None, eps=0.0)
    with pytest.raises(ValueError, match=r"eps must be positive"):
        rmsnorm_fn(x, torch.ones(8), None, eps=-1.0)
    for p in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match=r"dropout_p must be a number in \[0, 1\)"):
            rms_norm_fn(x, torch.ones(8), None, dropout_p=p)
    with pytest.raises(ValueError, match=r"rowscale must hold one scale per row of x: shape \(2, 3\) or \(6,\)"):
        rms_norm_fn(torch.randn(2, 3, 8), torch.ones(8), None, rowscale=torch.ones(3))
    with pytest.raises(ValueError, match=r"rowscale cannot be combined with x1"):
        rms_norm_fn(x, torch.ones(8), None, x1=torch.randn(3, 8), rowscale=torch.ones(3))
    with pytest.raises(TypeError, match=r"rowscale must be a torch.Tensor"):
        rms_norm_fn(x, torch.ones(8), None, rowscale=[1.0, 1.0, 1.0])


def test_valid_arguments_pass():
    """The argument sets above are valid before each override: the errors come from the override alone."""
    selective_scan_fn(**scan_args())
    mamba_chunk_scan_combined(**ssd_args(), dt_limit=(0.0, math.inf))
    mamba_chunk_scan_combined(**varlen_args(), state_dtype=torch.float64)
