"""Reference decode steps of whole blocks: the specification of ``mamba_block_step``,
``mamba2_block_step`` and ``mlp_block_step``.

A block is ``norm -> mixer`` (or ``norm2 -> mlp``) on the residual stream (see
``lnlm_ssm.models.backbone``). One decode step of a block, for one new position:

1. h <- hidden_states + residual (hidden_states alone for the first block, residual None);
   n <- norm(h) ⊙ norm_weight (+ norm_bias): RMSNorm when ``rms_norm``, else LayerNorm.
2. the mixer's (or MLP's) step on n, its states updated in place:

   - Mamba-1 (``layers.mamba``): [x | z] <- in_proj(n); x <- silu(conv update of x);
     [δ | B | C] <- x_proj(x); Δ <- dt_proj(δ) (its bias is the state update's dt_bias);
     y <- state update (softplus(Δ + dt_bias), A, B, C, D, gate silu(z)); out <- out_proj(y).
   - Mamba-2 (``layers.mamba2``): [z | xBC | Δ] <- in_proj(n); xBC <- silu(conv update of xBC);
     [x | B | C] <- xBC (x in heads of headdim, B and C in ngroups groups); Δ <- softplus(Δ + dt_bias),
     clamped to [dt_min, dt_max] when that is not (0, inf); y <- state update (A per head, D);
     y <- RMSNormGated(y, z) when ``gate_norm_weight`` is given (else the state update gates
     by silu(z)); out <- out_proj(y).
   - MLP (``layers.mlp.GatedMLP``, silu): [v | g] <- fc1(n); out <- fc2(v ⊙ silu(g)).
   - attention (``layers.attention``), one query per row at cache slot ``past``:
     [q | k | v] <- in_proj(n) (heads of head_dim); RoPE on the first rotary_dim channels of
     q and k at the row's ``positions`` (angle position * base^(-2j / rotary_dim), "rotate
     half" or interleaved pairs); k, v -> the caches at slot past; the query attends (softmax
     of q·k * softmax_scale) to the keys s <= past that are real (``key_mask``, the new one
     always) and, with a sliding window W > 0, s > past - W; query head h reads kv head
     h // (num_heads / num_heads_kv); out <- out_proj(attention).

3. returns (out, h): out (batch, d_model) is the block's output, h the residual
   stream the next block adds it to.

A whole decode step (``decode_step_ref``) is the token embedding of one id per row,
the blocks in turn, and the final norm of out + h.

Every block's projections may be weight-only quantised (``lnlm_ssm.quantize_``):
a weight int8 with its per-row scale (``in_proj_scale``, ``fc1_scale``, ...: each
step's last arguments, None for other weights), or bf16; the product is
``weight_only_linear_ref``'s, everything else stays float32. So may the embedding
of ``decode_step_ref`` (``embedding_scale``).

Glossary (b = batch; everything float32 unless quantised as above):

=====================  ======================================  ==============================================
argument               shape                                   meaning
=====================  ======================================  ==============================================
hidden_states          (b, d_model)                            the previous block's output (or the embedding)
residual               (b, d_model) or None                    the residual stream so far
norm_weight, norm_bias (d_model,), (d_model,) or None          the block norm (bias: LayerNorm only)
in_proj_weight/_bias   (out, d_model), (out,) or None          Mamba-1: out = 2 d_inner;
                                                               Mamba-2: out = 2 d_inner + 2 ngroups d_state + nheads
conv_weight/_bias      (conv_dim, width), (conv_dim,) or None  depthwise causal conv (conv_dim: Mamba-1 d_inner,
                                                               Mamba-2 d_inner + 2 ngroups d_state)
conv_state             (b, conv_dim, width)                    the last ``width`` conv inputs, newest last
x_proj_weight          (dt_rank + 2 d_state, d_inner)          Mamba-1: x -> [δ | B | C]
dt_proj_weight/_bias   (d_inner, dt_rank), (d_inner,)          Mamba-1: δ -> Δ, and Δ's bias
A                      (d_inner, d_state) / (nheads,)          -exp(A_log): Mamba-1 / Mamba-2
D                      (d_inner,) / (nheads,) or (d_inner,)    skip connection: Mamba-1 / Mamba-2
dt_bias                (nheads,)                               Mamba-2: Δ's bias
ssm_state              (b, d_inner, d_state) /                 Mamba-1 / Mamba-2, in place
                       (b, nheads, headdim, d_state)
gate_norm_*            weight (d_inner,) or None, eps,         Mamba-2's RMSNormGated: groups of group_size
                       group_size, norm_before_gate            channels (d_inner // ngroups)
out_proj_weight/_bias  (d_model, d_inner), (d_model,) or None   (attention: d_inner = num_heads head_dim)
fc1_*, fc2_*           (2 hidden, d_model), (d_model, hidden)  MLP
k_cache, v_cache       (b, max_seqlen, num_heads_kv, head_dim) attention, written at slot past
past, positions        int; (b,) int64                         attention: the new position's slot, RoPE position
key_mask               (b, past + 1) bool or None              attention: the real keys (None: all)
=====================  ======================================  ==============================================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lnlm_ssm.ops.conv1d.reference import causal_conv1d_update_ref
from lnlm_ssm.ops.linear.reference import dequantize_weight, weight_only_linear_ref
from lnlm_ssm.ops.norm.reference import layer_norm_ref, rms_norm_gated_ref, rms_norm_ref
from lnlm_ssm.ops.state_update.reference import selective_state_update_ref


def add_norm_ref(hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm):
    """Step 1: (norm(h), h) with h = hidden_states + residual."""
    norm = rms_norm_ref if rms_norm else layer_norm_ref
    return norm(hidden_states, norm_weight, norm_bias, residual=residual, eps=norm_eps, prenorm=True, upcast=True)


def _project(x, weight, scale, bias=None):
    """``F.linear``, or ``weight_only_linear_ref`` for a weight-only quantised weight (int8 with ``scale``, bf16)."""
    if weight.dtype == torch.float32:
        return F.linear(x, weight, bias)
    return weight_only_linear_ref(x, weight, scale, bias)


def mamba_block_step_ref(
    hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias, conv_weight,
    conv_bias, conv_state, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D, ssm_state, out_proj_weight,
    out_proj_bias, in_proj_scale=None, x_proj_scale=None, dt_proj_scale=None, out_proj_scale=None,
):
    """A norm + Mamba-1 block's decode step; see the module docstring."""
    n, h = add_norm_ref(hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm)
    x, z = _project(n, in_proj_weight, in_proj_scale, in_proj_bias).chunk(2, dim=-1)
    x = causal_conv1d_update_ref(x, conv_state, conv_weight, conv_bias, activation="silu")
    dt_rank, d_state = dt_proj_weight.shape[1], A.shape[1]
    delta, B, C = _project(x, x_proj_weight, x_proj_scale).split([dt_rank, d_state, d_state], dim=-1)
    dt = _project(delta, dt_proj_weight, dt_proj_scale)
    y = selective_state_update_ref(ssm_state, x, dt, A, B, C, D, z, dt_bias=dt_proj_bias, dt_softplus=True)
    return _project(y, out_proj_weight, out_proj_scale, out_proj_bias), h


def mamba2_block_step_ref(
    hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias, conv_weight,
    conv_bias, conv_state, dt_bias, A, D, ssm_state, dt_min, dt_max, gate_norm_weight, gate_norm_eps,
    gate_norm_group_size, norm_before_gate, out_proj_weight, out_proj_bias, in_proj_scale=None, out_proj_scale=None,
):
    """A norm + Mamba-2 block's decode step; see the module docstring."""
    n, h = add_norm_ref(hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm)
    batch, nheads, headdim, d_state = ssm_state.shape
    d_inner, conv_dim = nheads * headdim, conv_state.shape[1]
    group_width = (conv_dim - d_inner) // 2
    z, xBC, dt = _project(n, in_proj_weight, in_proj_scale, in_proj_bias).split([d_inner, conv_dim, nheads], dim=-1)
    xBC = causal_conv1d_update_ref(xBC, conv_state, conv_weight, conv_bias, activation="silu")
    x, B, C = xBC.split([d_inner, group_width, group_width], dim=-1)
    dt_softplus = True
    if (dt_min, dt_max) != (0.0, math.inf):
        dt = F.softplus(dt + dt_bias).clamp(dt_min, dt_max)
        dt_bias, dt_softplus = None, False
    gated = gate_norm_weight is not None
    y = selective_state_update_ref(
        ssm_state,
        x.view(batch, nheads, headdim),
        dt[..., None].expand(batch, nheads, headdim),
        A[:, None, None].expand(nheads, headdim, d_state),
        B.view(batch, -1, d_state),
        C.view(batch, -1, d_state),
        D.view(nheads, -1).expand(nheads, headdim),
        None if gated else z.view(batch, nheads, headdim),
        dt_bias=None if dt_bias is None else dt_bias[:, None].expand(nheads, headdim),
        dt_softplus=dt_softplus,
    ).reshape(batch, d_inner)
    if gated:
        y = rms_norm_gated_ref(y, gate_norm_weight, None, z, gate_norm_eps, gate_norm_group_size, norm_before_gate)
    return _project(y, out_proj_weight, out_proj_scale, out_proj_bias), h


def rotary_ref(x, positions, rotary_dim, rotary_base, interleaved):
    """RoPE of the first ``rotary_dim`` channels of x (b, heads, head_dim) at ``positions`` (b,), in fp32."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=x.device) / rotary_dim
    angles = positions.to(torch.float32)[:, None] * rotary_base ** (-exponents)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # broadcast over heads
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((rotated, rest), dim=-1)


def attention_block_step_ref(
    hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias, k_cache,
    v_cache, past, positions, key_mask, num_heads, softmax_scale, sliding_window, rotary_dim, rotary_base,
    rotary_interleaved, out_proj_weight, out_proj_bias, in_proj_scale=None, out_proj_scale=None,
):
    """A norm + attention block's decode step; see the module docstring."""
    n, h = add_norm_ref(hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm)
    batch, _, heads_kv, head_dim = k_cache.shape
    q, k, v = _project(n, in_proj_weight, in_proj_scale, in_proj_bias).split(
        [num_heads * head_dim, heads_kv * head_dim, heads_kv * head_dim], dim=-1
    )
    q, k, v = q.view(batch, num_heads, head_dim), k.view(batch, heads_kv, head_dim), v.view(batch, heads_kv, head_dim)
    if rotary_dim:
        q = rotary_ref(q, positions, rotary_dim, rotary_base, rotary_interleaved)
        k = rotary_ref(k, positions, rotary_dim, rotary_base, rotary_interleaved)
    k_cache[:, past] = k
    v_cache[:, past] = v
    group = num_heads // heads_kv
    keys = k_cache[:, : past + 1].repeat_interleave(group, dim=2)  # (b, past + 1, num_heads, head_dim)
    values = v_cache[:, : past + 1].repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,bthd->bht", q, keys) * softmax_scale
    slots = torch.arange(past + 1, device=q.device)
    seen = (slots > past - sliding_window) if sliding_window > 0 else torch.ones_like(slots, dtype=torch.bool)
    seen = seen.expand(batch, -1)
    if key_mask is not None:
        seen = seen & (key_mask | (slots == past))
    attention = torch.softmax(scores.masked_fill(~seen[:, None, :], float("-inf")), dim=-1)
    out = torch.einsum("bht,bthd->bhd", attention, values).reshape(batch, num_heads * head_dim)
    return _project(out, out_proj_weight, out_proj_scale, out_proj_bias), h


def mlp_block_step_ref(
    hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
    fc1_scale=None, fc2_scale=None,
):
    """A norm2 + GatedMLP (silu) block's step; see the module docstring."""
    n, h = add_norm_ref(hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm)
    value, gate = _project(n, fc1_weight, fc1_scale, fc1_bias).chunk(2, dim=-1)
    return _project(value * F.silu(gate), fc2_weight, fc2_scale, fc2_bias), h



BLOCK_STEPS = {
    "mamba_block_step": mamba_block_step_ref,
    "mamba2_block_step": mamba2_block_step_ref,
    "mlp_block_step": mlp_block_step_ref,
    "attention_block_step": attention_block_step_ref,
}
# Where an attention block's per-step arguments (past, positions, key_mask) go among its params.
ATTENTION_CONTEXT_AT = 8


def call_block_step(step, op, hidden_states, residual, params, context):
    """``step`` (a block step of ``op``) on its ``params``, with ``context`` = (past, positions, key_mask)
    put in place for an attention block (the others take none)."""
    if op == "attention_block_step":
        params = params[:ATTENTION_CONTEXT_AT] + tuple(context) + params[ATTENTION_CONTEXT_AT:]
    return step(hidden_states, residual, *params)


def embed_ref(input_ids, embedding, vocab_size, embedding_scale=None):
    """The rows of ``embedding`` (padded_vocab_size, d_model) of ``input_ids`` (batch,) in [0, vocab_size), in fp32
    (a quantised embedding's rows as they stand: int8 times ``embedding_scale``, or bf16)."""
    if not bool(((input_ids >= 0) & (input_ids < vocab_size)).all()):
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got {input_ids.tolist()}")
    if embedding.dtype == torch.float32:
        return F.embedding(input_ids, embedding)
    scale = None if embedding_scale is None else embedding_scale[input_ids]
    return dequantize_weight(embedding[input_ids], scale)


def decode_positions(input_ids, past, positions):
    """Attention's rotary positions: ``positions``, or ``past`` for every row."""
    return torch.full(input_ids.shape, past, dtype=torch.int64) if positions is None else positions


def decode_step_ref(
    input_ids, embedding, vocab_size, blocks, final_norm, past=0, positions=None, key_mask=None, embedding_scale=None
):
    """The final norm's output (batch, d_model) for ``input_ids`` (batch,) in [0, vocab_size).

    ``embedding`` (padded_vocab_size, d_model); ``blocks``: (op name, params) pairs, each
    op's arguments after ``residual`` (an attention block's without past, positions and
    key_mask, which the step gives them all); ``final_norm``: (weight, bias, eps, rms_norm).
    ``positions`` None: ``past`` for every row; ``embedding_scale``: an int8 embedding's.
    """
    context = (past, decode_positions(input_ids, past, positions), key_mask)
    hidden, residual = embed_ref(input_ids, embedding, vocab_size, embedding_scale), None
    for op, params in blocks:
        hidden, residual = call_block_step(BLOCK_STEPS[op], op, hidden, residual, params, context)
    return add_norm_ref(hidden, residual, *final_norm)[0]
