"""Causal depthwise conv1d in Triton: forward, backward and the decode update.

Same call signatures as ``cpu.py``. Each program takes a (channels x time)
tile of one batch entry; x is read through its strides, so a channel-last x
(Mamba-2's ``xBC.transpose(1, 2)``) is not copied. The backward recomputes the
pre-activation where silu needs it (width <= 4: a few cached loads per element)
and writes per-tile partial sums of the weight and bias gradients, summed with
torch afterwards: deterministic, no atomics. The final states (the last
width - 1 inputs) are sliced with torch outside the autograd.Function, as in
``cpu.py``, so a gradient through them alone needs no kernel.

Math runs in fp32; outputs are in x's dtype, gradients in their input's dtype.
float64 inputs are refused (backend "reference" or "cpu" do float64 math).
Block sizes follow from the shape, with no autotuning.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from lnlm_ssm.ops._triton import library_op as _library_op
from lnlm_ssm.ops._triton import refuse_float64
from lnlm_ssm.ops._triton import reduce_sum as _sum
from lnlm_ssm.ops._triton import sigmoid as _sigmoid
from lnlm_ssm.ops._triton import store_rounded as _store
from lnlm_ssm.ops._triton import wrap as _wrap
from lnlm_ssm.ops.conv1d.reference import SILU_NAMES, final_states, update_history



@triton.jit
def _seq_at(seq_ptr, b, s, seq_sb, seq_sl, seqlen):
    """The packed-sequence id of positions s; the history (s < 0) belongs to the row's first sequence."""
    s = tl.minimum(tl.maximum(s, 0), seqlen - 1).to(tl.int64)
    return tl.load(seq_ptr + b * seq_sb + s * seq_sl)


@triton.jit
def _input_at(
    x_ptr, init_ptr, seq_ptr, b, d, s, seq_of, d_ok, seqlen,
    x_sb, x_sd, x_sl, i_sb, i_sd, i_sk, seq_sb, seq_sl,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, WIDTH: tl.constexpr,
):
    """The padded input at positions s (history before 0), fp32, zero where it belongs to
    another packed sequence than ``seq_of``."""
    # int64 offsets: a channel-last x has a time stride of dim.
    inside = d_ok[:, None] & ((s >= 0) & (s < seqlen))[None, :]
    x_at = x_ptr + b * x_sb + d[:, None].to(tl.int64) * x_sd + s[None, :].to(tl.int64) * x_sl
    v = tl.load(x_at, mask=inside, other=0.0).to(tl.float32)
    if HAS_INIT:
        # Only the width - 1 history positions: the backward also asks for earlier ones
        # (outputs before 0, whose gradient is masked to 0), and reading those would
        # go before initial_states' memory; garbage there can be NaN, and 0 * NaN is NaN.
        before = d_ok[:, None] & ((s < 0) & (s >= -(WIDTH - 1)))[None, :]
        k = s + (WIDTH - 1)
        v += tl.load(init_ptr + b * i_sb + d[:, None] * i_sd + k[None, :] * i_sk, mask=before, other=0.0).to(
            tl.float32
        )
    if HAS_SEQ:
        v = tl.where((_seq_at(seq_ptr, b, s, seq_sb, seq_sl, seqlen) == seq_of)[None, :], v, 0.0)
    return v


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, out_ptr,
    dim, seqlen,
    x_sb, x_sd, x_sl, w_sd, w_sk, i_sb, i_sd, i_sk, seq_sb, seq_sl,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    d_ok = d < dim
    seq_t = t
    if HAS_SEQ:
        seq_t = _seq_at(seq_ptr, b, t, seq_sb, seq_sl, seqlen)
    acc = tl.full((BLOCK_D, BLOCK_L), 0.0, tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(WIDTH):
        w = tl.load(w_ptr + d * w_sd + k * w_sk, mask=d_ok, other=0.0).to(tl.float32)
        v = _input_at(x_ptr, init_ptr, seq_ptr, b, d, t - (WIDTH - 1) + k, seq_t, d_ok, seqlen,
                      x_sb, x_sd, x_sl, i_sb, i_sd, i_sk, seq_sb, seq_sl, HAS_INIT, HAS_SEQ, WIDTH)
        acc += w[:, None] * v
    if HAS_SEQ:
        acc = tl.where((seq_t >= 0)[None, :], acc, 0.0)  # padding
    if SILU:
        acc = acc * _sigmoid(acc)
    out = out_ptr + b * dim * seqlen + d[:, None].to(tl.int64) * seqlen + t[None, :]
    _store(out, acc, d_ok[:, None] & (t < seqlen)[None, :])


@triton.jit
def _conv_bwd_kernel(
    g_ptr, x_ptr, w_ptr, bias_ptr, init_ptr, seq_ptr, dx_ptr, dinit_ptr, dw_part_ptr, db_part_ptr,
    dim, seqlen,
    g_sb, g_sd, g_sl, x_sb, x_sd, x_sl, w_sd, w_sk, i_sb, i_sd, i_sk, seq_sb, seq_sl,
    HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
    WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # Tiles cover input positions s in [-(width - 1), seqlen): the history's
    # gradient (s < 0) is the same sum as x's.
    s = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L) - (WIDTH - 1)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    d_ok = d < dim
    seq_s = s
    if HAS_SEQ:
        seq_s = _seq_at(seq_ptr, b, s, seq_sb, seq_sl, seqlen)
    bias = tl.full((BLOCK_D,), 0.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)

    # d input[s] = sum_k w[k] * d pre[t] over the outputs t = s + width - 1 - k that read it.
    dsum = tl.full((BLOCK_D, BLOCK_L), 0.0, tl.float32)
    d_pre_own = tl.full((BLOCK_D, BLOCK_L), 0.0, tl.float32)
    for k in tl.static_range(WIDTH):
        t = s + (WIDTH - 1 - k)
        reads = (t >= 0) & (t < seqlen)
        if HAS_SEQ:
            seq_t = _seq_at(seq_ptr, b, t, seq_sb, seq_sl, seqlen)
            reads = reads & (seq_t == seq_s) & (seq_t >= 0)  # a padding output has no gradient to pass on
        else:
            seq_t = t
        mask = d_ok[:, None] & reads[None, :]
        g_at = g_ptr + b * g_sb + d[:, None].to(tl.int64) * g_sd + t[None, :].to(tl.int64) * g_sl
        d_pre = tl.load(g_at, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            pre = tl.full((BLOCK_D, BLOCK_L), 0.0, tl.float32) + bias[:, None]
            for j in tl.static_range(WIDTH):
                w_j = tl.load(w_ptr + d * w_sd + j * w_sk, mask=d_ok, other=0.0).to(tl.float32)
                pre += w_j[:, None] * _input_at(
                    x_ptr, init_ptr, seq_ptr, b, d, t - (WIDTH - 1) + j, seq_t, d_ok, seqlen,
                    x_sb, x_sd, x_sl, i_sb, i_sd, i_sk, seq_sb, seq_sl, HAS_INIT, HAS_SEQ, WIDTH)
            sig = _sigmoid(pre)
            d_pre = d_pre * sig * (1.0 + pre * (1.0 - sig))
        w_k = tl.load(w_ptr + d * w_sd + k * w_sk, mask=d_ok, other=0.0).to(tl.float32)
        dsum += w_k[:, None] * d_pre
        if k == WIDTH - 1:
            d_pre_own = d_pre  # t == s: the gradient of the output at this tile's own positions

    row = b * dim * seqlen + d[:, None].to(tl.int64) * seqlen
    _store(dx_ptr + row + s[None, :], dsum, d_ok[:, None] & ((s >= 0) & (s < seqlen))[None, :])
    if HAS_INIT:
        dinit = dinit_ptr + b * dim * (WIDTH - 1) + d[:, None] * (WIDTH - 1) + (s + WIDTH - 1)[None, :]
        tl.store(dinit, dsum, mask=d_ok[:, None] & (s < 0)[None, :])

    # This tile's share of the weight and bias gradients.
    part = (tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)).to(tl.int64)
    if HAS_BIAS:
        tl.store(db_part_ptr + part * dim + d, _sum(d_pre_own, axis=1), mask=d_ok)
    for k in tl.static_range(WIDTH):
        v = _input_at(x_ptr, init_ptr, seq_ptr, b, d, s - (WIDTH - 1) + k, seq_s, d_ok, seqlen,
                      x_sb, x_sd, x_sl, i_sb, i_sd, i_sk, seq_sb, seq_sl, HAS_INIT, HAS_SEQ, WIDTH)
        tl.store(dw_part_ptr + (part * dim + d) * WIDTH + k, _sum(d_pre_own * v, axis=1), mask=d_ok)


@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, seqlens_ptr, index_ptr, out_ptr,
    dim, steps, state_len,
    x_sb, x_sd, x_sl, s_sb, s_sd, s_sl, w_sd, w_sk, seqlens_s, index_s,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, WIDTH: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Positions c index the concatenation [conv_state oldest first, x] of length state_len + steps.
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(1).to(tl.int64)
    d_ok = d < dim
    slot = b
    if HAS_INDEX:
        slot = tl.load(index_ptr + b * index_s).to(tl.int64)
    # A padding row (slot < 0) outputs 0 and touches no state. (0 * d: Triton's
    # interpreter cannot combine a scalar mask with a tensor one.)
    state_ok = d_ok & (slot + 0 * d >= 0)
    # The slot of the state's oldest input: a circular buffer's next write slot.
    head = b * 0
    if HAS_SEQLENS:
        head = tl.load(seqlens_ptr + b * seqlens_s).to(tl.int64) % state_len
    x_row = x_ptr + b * x_sb + d[:, None] * x_sd
    state_row = state_ptr + slot * s_sb + d[:, None] * s_sd

    t = tl.arange(0, BLOCK_L)
    t_ok = d_ok[:, None] & (t < steps)[None, :]
    acc = tl.full((BLOCK_D, BLOCK_L), 0.0, tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(WIDTH):
        c = (state_len - (WIDTH - 1) + t + k)[None, :]
        at = c + head
        at = tl.where(at >= state_len, at - state_len, at)
        v = tl.load(state_row + at * s_sl, mask=t_ok & state_ok[:, None] & (c < state_len), other=0.0).to(tl.float32)
        v += tl.load(x_row + (c - state_len) * x_sl, mask=t_ok & (c >= state_len), other=0.0).to(tl.float32)
        w = tl.load(w_ptr + d * w_sd + k * w_sk, mask=d_ok, other=0.0).to(tl.float32)
        acc += w[:, None] * v
    if SILU:
        acc = acc * _sigmoid(acc)
    acc = tl.where(state_ok[:, None], acc, 0.0)

    if HAS_SEQLENS:
        # x goes to the slots from the head on; of more than state_len inputs only the last state_len stay.
        keep = (t < steps) & (t >= steps - state_len)
        new = tl.load(x_row + t[None, :] * x_sl, mask=d_ok[:, None] & keep[None, :], other=0.0).to(tl.float32)
        at = ((head + t) % state_len)[None, :]
        # Every thread's reads of the old state come before any thread's writes.
        tl.debug_barrier()
        _store(state_row + at * s_sl, new, state_ok[:, None] & keep[None, :])
    else:
        # The state shifted left by ``steps``, x entering at its end.
        j = tl.arange(0, BLOCK_S)
        c = (j + steps)[None, :]
        j_ok = state_ok[:, None] & (j < state_len)[None, :]
        new = tl.load(state_row + c * s_sl, mask=j_ok & (c < state_len), other=0.0).to(tl.float32)
        new += tl.load(x_row + (c - state_len) * x_sl, mask=j_ok & (c >= state_len), other=0.0).to(tl.float32)
        tl.debug_barrier()
        _store(state_row + j[None, :] * s_sl, new, j_ok)
    _store(out_ptr + b * dim * steps + d[:, None].to(tl.int64) * steps + t[None, :], acc, t_ok)


def _strides(t: Optional[torch.Tensor], ndim: int) -> tuple:
    return (0,) * ndim if t is None else t.stride()


def _blocks(dim: int, length: int, tile: int = 2048) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_L): time blocks up to 64, channels filling the rest of the tile."""
    block_l = min(64, triton.next_power_of_2(max(length, 1)))
    return min(triton.next_power_of_2(dim), max(1, tile // block_l)), block_l


def _fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    initial_states: Optional[torch.Tensor],
    seq_idx: Optional[torch.Tensor],
    silu: bool,
) -> torch.Tensor:
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    out = torch.empty((batch, dim, seqlen), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d, block_l = _blocks(dim, seqlen)
    grid = (triton.cdiv(seqlen, block_l), triton.cdiv(dim, block_d), batch)
    has_init = initial_states is not None and width > 1
    _wrap(_conv_fwd_kernel)[grid](
        x, weight, x if bias is None else bias, initial_states if has_init else x, x if seq_idx is None else seq_idx,
        out, dim, seqlen,
        *x.stride(), *weight.stride(), *_strides(initial_states if has_init else None, 3), *_strides(seq_idx, 2),
        HAS_BIAS=bias is not None, HAS_INIT=has_init, HAS_SEQ=seq_idx is not None, SILU=silu,
        WIDTH=width, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=4,
    )
    return out


def _fwd_fake(x, weight, bias, initial_states, seq_idx, silu):
    return x.new_empty(x.shape)


def _bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    initial_states: Optional[torch.Tensor],
    seq_idx: Optional[torch.Tensor],
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx in x's dtype; dweight, dbias and dinitial_states in fp32 (empty when absent)."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    has_init = initial_states is not None and width > 1
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.empty((batch, dim, seqlen), dtype=x.dtype, device=x.device)
    dinit = torch.zeros((batch, dim, width - 1) if initial_states is not None else (0,), **f32)
    block_d, block_l = _blocks(dim, seqlen + width - 1)
    tiles_l = triton.cdiv(seqlen + width - 1, block_l)
    dw_part = torch.zeros((batch * tiles_l, dim, width), **f32)
    db_part = torch.zeros((batch * tiles_l, dim) if bias is not None else (0,), **f32)
    if batch * dim > 0:
        grid = (tiles_l, triton.cdiv(dim, block_d), batch)
        _wrap(_conv_bwd_kernel)[grid](
            grad_out, x, weight, x if bias is None else bias, initial_states if has_init else x,
            # An absent buffer's pointer is never read: any live tensor will do.
            x if seq_idx is None else seq_idx, dx, dinit if has_init else dx, dw_part,
            db_part if bias is not None else dw_part, dim, seqlen,
            *grad_out.stride(), *x.stride(), *weight.stride(), *_strides(initial_states if has_init else None, 3),
            *_strides(seq_idx, 2),
            HAS_BIAS=bias is not None, HAS_INIT=has_init, HAS_SEQ=seq_idx is not None, SILU=silu,
            WIDTH=width, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=4,
        )
    dbias = db_part.sum(0) if bias is not None else db_part
    return dx, dw_part.sum(0), dbias, dinit


def _bwd_fake(grad_out, x, weight, bias, initial_states, seq_idx, silu):
    batch, dim, _ = x.shape
    return (
        x.new_empty(x.shape),
        weight.new_empty(weight.shape, dtype=torch.float32),
        weight.new_empty((dim,) if bias is not None else (0,), dtype=torch.float32),
        weight.new_empty((batch, dim, weight.shape[1] - 1) if initial_states is not None else (0,), dtype=torch.float32),
    )


def _update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    silu: bool,
    cache_seqlens: Optional[torch.Tensor],
    conv_state_indices: Optional[torch.Tensor],
) -> torch.Tensor:
    batch, dim, steps = x.shape
    state_len = conv_state.shape[-1]
    width = weight.shape[1]
    out = torch.empty((batch, dim, steps), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_l, block_s = triton.next_power_of_2(steps), triton.next_power_of_2(max(state_len, 1))
    block_d = min(triton.next_power_of_2(dim), max(1, 2048 // max(block_l, block_s)))
    grid = (triton.cdiv(dim, block_d), batch)
    _wrap(_conv_update_kernel)[grid](
        x, conv_state, weight, x if bias is None else bias,
        # An absent buffer's pointer is never read: any live tensor will do.
        x if cache_seqlens is None else cache_seqlens, x if conv_state_indices is None else conv_state_indices,
        out, dim, steps, state_len,
        *x.stride(), *conv_state.stride(), *weight.stride(),
        *_strides(cache_seqlens, 1), *_strides(conv_state_indices, 1),
        HAS_BIAS=bias is not None, SILU=silu, WIDTH=width,
        # An empty buffer (width 1) has no slots to go round: it is the same as a shift register.
        HAS_SEQLENS=cache_seqlens is not None and state_len > 0, HAS_INDEX=conv_state_indices is not None,
        BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_S=block_s, num_warps=4,
    )
    return out


def _update_fake(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices):
    return x.new_empty(x.shape)


_fwd_op = _library_op("causal_conv1d_fwd", _fwd, (), _fwd_fake)
_bwd_op = _library_op("causal_conv1d_bwd", _bwd, (), _bwd_fake)
_update_op = _library_op("causal_conv1d_update", _update, ("conv_state",), _update_fake)


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, seq_idx, silu):
        out = _fwd_op(x, weight, bias, initial_states, seq_idx, silu)
        ctx.save_for_backward(x, weight, bias, initial_states, seq_idx)
        ctx.silu = silu
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, initial_states, seq_idx = ctx.saved_tensors
        dx, dweight, dbias, dinit = _bwd_op(grad_out, x, weight, bias, initial_states, seq_idx, ctx.silu)
        return (
            dx,
            dweight.to(weight.dtype),
            None if bias is None else dbias.to(bias.dtype),
            None if initial_states is None else dinit.to(initial_states.dtype),
            None,
            None,
        )


def causal_conv1d_triton(
    x, weight, bias=None, activation=None, *, initial_states=None, return_final_states=False, seq_idx=None
):
    refuse_float64("causal_conv1d", "x", x)
    out = _CausalConv1d.apply(x, weight, bias, initial_states, seq_idx, activation in SILU_NAMES)
    if not return_final_states:
        return out
    return out, final_states(x, initial_states, weight.shape[1])


def causal_conv1d_update_triton(
    x, conv_state, weight, bias=None, activation=None, cache_seqlens=None, conv_state_indices=None
):
    refuse_float64("causal_conv1d_update", "x", x)
    steps = x.unsqueeze(-1) if x.ndim == 2 else x
    args = (weight, bias, activation in SILU_NAMES, cache_seqlens, conv_state_indices)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        out = _update_op(steps, conv_state, *args)
        return out.squeeze(-1) if x.ndim == 2 else out
    # The update kernel has no backward: differentiate the convolution of x after
    # the history the kernel reads, taken before it takes x in.
    history = update_history(conv_state, weight.shape[1], cache_seqlens, conv_state_indices)
    out = causal_conv1d_triton(steps, weight, bias, activation, initial_states=history)
    if conv_state_indices is not None:
        out = out.masked_fill((conv_state_indices < 0)[:, None, None], 0)
    with torch.no_grad():
        _update_op(steps, conv_state, *args)
    return out.squeeze(-1) if x.ndim == 2 else out
