"""Reference Mamba-2 SSD scan: the chunked formulation and the step-by-step recurrence.

Glossary (mamba_ssm's layout; b batch, l seqlen, h heads, p headdim, g groups, n dstate):

==============  ==============  ================================================
symbol          shape           meaning
==============  ==============  ================================================
x               (b, l, h, p)    input
dt              (b, l, h)       step size Δ, one per head and step
A               (h,)            scalar decay rate per head (negative for a stable SSM)
B, C            (b, l, g, n)    input and output projections; group j serves heads
                                [j*h/g, (j+1)*h/g)
D               (h,) or (h, p)  skip connection
z               (b, l, h, p)    gate
seq_idx         (b, l)          integer id of the packed sequence each token belongs to
cu_seqlens      (s + 1,)        offsets of the s packed sequences of a batch of one row:
                                sequence i is tokens [cu_seqlens[i], cu_seqlens[i+1])
h_t             (b, h, p, n)    state; ``initial_states`` is the state before step 0
final_states    (b, h, p, n)    h after the last step
varlen_states   (s, h, p, n)    h after the last step of each packed sequence
==============  ==============  ================================================

The recurrence (Mamba-2 paper, eq. 1 with scalar A per head):

    Δ_t = clamp(softplus(dt_t + dt_bias), *dt_limit)
    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t          (h_t := 0 first where seq_idx changes)
    y_t = h_t C_t + D x_t,   then y_t ⊙ silu(z_t)

``ssd_recurrent_ref`` runs it one step at a time. ``mamba_chunk_scan_ref``
computes the same thing chunk by chunk (paper, section 6, "SSD algorithm"):

1. split the sequence into chunks of ``chunk_size`` steps (zero-padded: Δ=0 leaves the state alone);
2. within a chunk, y is a masked attention-like matmul: y_t = Σ_{s≤t} (C_t·B_s) exp(Σ_{s<k≤t} Δ_k A) Δ_s x_s;
3. each chunk's own contribution to the state at its end;
4. pass states from chunk to chunk (a short sequential loop over chunks);
5. add each chunk's entering state, decayed to every position, read out through C.

Math runs in fp32 (float64 when x is float64); y is returned in x's dtype,
final states in the math dtype and varlen states in C's dtype (mamba_ssm's
choices; ``state_dtype`` sets both states' dtype). Tokens whose seq_idx differs
never interact; ``initial_states`` belong to the first packed sequence of each
row. With seq_idx marking the sequences of cu_seqlens, varlen_states[i] is the
final state of sequence i scanned alone: from ``initial_states`` for the one
holding token 0, from zero for the others (zero if it is empty).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from lnlm_ssm.utils.checks import NO_DT_LIMIT, check_dt_limit
from lnlm_ssm.utils.dtypes import math_dtype


def discretise_dt(dt, dt_bias, dt_softplus, dt_limit, compute):
    """Δ from dt: + dt_bias, softplus if asked, clamped to dt_limit (nothing clamped by default), in ``compute``."""
    dt = dt.to(compute)
    if dt_bias is not None:
        dt = dt + dt_bias.to(compute)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != NO_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def dt_clamp_bounds(dt_limit) -> tuple[float, float]:
    """``dt_limit`` as the (min, max) the kernels clamp Δ to.

    The default (no limit) clamps nothing, as above: a negative Δ (dt without
    softplus) passes through, so the kernels, which always clamp, get -inf as
    min instead of 0.
    """
    low, high = check_dt_limit(dt_limit)
    return (-math.inf, high) if (low, high) == NO_DT_LIMIT else (low, high)


def _per_head(t, nheads):
    """B or C (..., g, n) for each head, (..., h, n): heads split as (g r), group g serving its r heads."""
    return repeat(t, "... g n -> ... (g r) n", r=nheads // t.shape[-2])


def _finish(y, x, D, z):
    if D is not None:
        D = D.to(y.dtype)
        y = y + x * (D[:, None] if D.ndim == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _segsum(a, same_seq):
    """S[..., t, s] = Σ_{s<k≤t} a[..., k] for s ≤ t (and tokens of one sequence), else -inf.

    Summing the masked increments directly, instead of subtracting two prefix
    sums, keeps it exact where the cumulative decay is large.
    """
    T = a.shape[-1]
    increments = a[..., :, None].expand(*a.shape, T)  # [..., k, s] = a[k]
    strictly_below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    S = increments.masked_fill(~strictly_below, 0.0).cumsum(dim=-2)
    keep = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0) & same_seq
    return S.masked_fill(~keep, -math.inf)


def mamba_chunk_scan_ref(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus=False,
    dt_limit=NO_DT_LIMIT,
    return_final_states=False,
    return_varlen_states=False,
    *,
    state_dtype=None,
):
    """The chunked scan (steps 1-5 above); varlen states by scanning each packed sequence alone."""
    out_dtype = x.dtype
    compute = math_dtype(x.dtype)
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[3]
    T = chunk_size
    nchunks = max(1, -(-seqlen // T))
    pad = nchunks * T - seqlen

    x_in = x.to(compute)
    varlen_states = None
    if return_varlen_states:  # from the raw inputs: each sequence runs through this function alone
        varlen_states = _per_sequence_final_states(
            x, dt, A, B, C, chunk_size, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_limit
        )
    dt = discretise_dt(dt, dt_bias, dt_softplus, dt_limit, compute)
    if seq_idx is None:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.long, device=x.device)
    seq_idx = seq_idx.long()
    first_seq = seq_idx[:, :1] if seqlen else torch.zeros(batch, 1, dtype=torch.long, device=x.device)

    # 1. Chunk, padding the tail with Δ=0 (a no-op step) of the last sequence.
    def chunked(t):
        t = F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad))
        return rearrange(t, "b (c l) ... -> b c l ...", l=T)

    xc = chunked(x_in)  # (b, c, T, h, p)
    dtc = chunked(dt)  # (b, c, T, h)
    Bc = _per_head(chunked(B.to(compute)), nheads)  # (b, c, T, h, n)
    Cc = _per_head(chunked(C.to(compute)), nheads)
    last_seq = seq_idx[:, -1:] if seqlen else first_seq
    seqc = rearrange(torch.cat([seq_idx, last_seq.expand(batch, pad)], dim=1), "b (c l) -> b c l", l=T)

    a = rearrange(dtc * A.to(compute), "b c l h -> b h c l")  # log-decay of each step
    same_seq = (seqc[:, :, :, None] == seqc[:, :, None, :])[:, None]  # (b, 1, c, T, T)
    S = _segsum(a, same_seq)  # (b, h, c, T, T)

    # 2. Within-chunk outputs: masked (C_t · B_s) decay Δ_s x_s.
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * torch.exp(S)
    y = torch.einsum("bhcls,bcsh,bcshp->bclhp", scores, dtc, xc)

    # 3. Each chunk's own state at its last step (S's last row: decay from s to the end).
    to_end = torch.exp(S[..., -1, :])  # (b, h, c, T)
    chunk_states = torch.einsum("bcshn,bhcs,bcsh,bcshp->bchpn", Bc, to_end, dtc, xc)

    # 4. Pass states across chunk boundaries; a state survives a chunk only if
    #    the chunk's last token is of the state's sequence.
    chunk_decay = torch.exp(a.sum(-1))  # (b, h, c)
    if initial_states is None:
        state = x_in.new_zeros(batch, nheads, headdim, dstate)
    else:
        state = initial_states.to(compute)
    state_seq = first_seq[:, 0]
    entering, entering_seq = [], []
    for c in range(nchunks):
        entering.append(state)
        entering_seq.append(state_seq)
        survives = (seqc[:, c, -1] == state_seq).to(compute)[:, None, None, None]
        state = state * chunk_decay[:, :, c, None, None] * survives + chunk_states[:, c]
        state_seq = seqc[:, c, -1]
    entering = torch.stack(entering, dim=1)  # (b, c, h, p, n)
    entering_seq = torch.stack(entering_seq, dim=1)  # (b, c)

    # 5. Entering state decayed to each position (inclusive prefix of the chunk), read out through C.
    prefix = torch.exp(a.cumsum(-1))  # (b, h, c, T)
    reaches = (seqc == entering_seq[:, :, None]).to(compute)[:, None]  # (b, 1, c, T)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, entering, prefix * reaches)

    y = rearrange(y, "b c l h p -> b (c l) h p")[:, :seqlen]
    y = _finish(y, x_in, D, z).to(out_dtype)
    return scan_outputs(y, state, varlen_states, C, return_final_states, state_dtype)


def _per_sequence_final_states(x, dt, A, B, C, chunk_size, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_limit):
    """(num_seqs, h, p, n): each packed sequence of row 0 scanned alone, from ``initial_states`` for
    the one holding token 0 (they belong to it in the packed scan) and from zero for the others;
    zero for an empty sequence, which holds no token."""
    compute = math_dtype(x.dtype)
    _, _, nheads, headdim = x.shape
    offsets = cu_seqlens.tolist()
    states = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        if start == end:
            states.append(x.new_zeros(nheads, headdim, B.shape[-1], dtype=compute))
            continue
        steps = slice(start, end)
        _, final = mamba_chunk_scan_ref(
            x[:, steps], dt[:, steps], A, B[:, steps], C[:, steps], chunk_size,
            dt_bias=dt_bias,
            initial_states=initial_states if start == 0 else None,
            dt_softplus=dt_softplus,
            dt_limit=dt_limit,
            return_final_states=True,
        )
        states.append(final[0])
    return torch.stack(states)


def scan_outputs(y, final_states, varlen_states, C, return_final_states, state_dtype):
    """What ``mamba_chunk_scan_combined`` returns, in mamba_ssm's order: y, then final_states if
    asked, then varlen_states if computed. The states come in ``state_dtype``; by default, as in
    mamba_ssm, final_states in the math dtype and varlen_states in C's dtype."""
    outputs = [y]
    if return_final_states:
        outputs.append(final_states if state_dtype is None else final_states.to(state_dtype))
    if varlen_states is not None:
        outputs.append(varlen_states.to(C.dtype if state_dtype is None else state_dtype))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def ssd_recurrent_ref(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    dt_limit=NO_DT_LIMIT,
    initial_states=None,
    seq_idx=None,
    return_final_states=False,
):
    """The SSD recurrence, one step at a time: the oracle for ``mamba_chunk_scan_ref``."""
    out_dtype = x.dtype
    compute = math_dtype(x.dtype)
    batch, seqlen, nheads, headdim = x.shape
    x_in = x.to(compute)
    dt = discretise_dt(dt, dt_bias, dt_softplus, dt_limit, compute)
    B = _per_head(B.to(compute), nheads)  # (b, l, h, n)
    C = _per_head(C.to(compute), nheads)
    A = A.to(compute)

    h = x_in.new_zeros(batch, nheads, headdim, B.shape[-1]) if initial_states is None else initial_states.to(compute)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            new_seq = (seq_idx[:, t] != seq_idx[:, t - 1]).to(compute)[:, None, None, None]
            h = h * (1 - new_seq)
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * x_in[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x_in.new_zeros(x.shape)
    y = _finish(y, x_in, D, z).to(out_dtype)
    return (y, h) if return_final_states else y
