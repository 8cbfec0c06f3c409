"""The state at the end of each packed sequence (``return_varlen_states``), from the states entering the chunks.

The cpu and triton scans keep the state entering each chunk; this one PyTorch
step turns those into the state after the last token of each sequence of
``cu_seqlens``. (The reference scans each sequence alone instead.) With seq_idx
marking the same sequences (the public function checks it), sequence i holds
tokens [s, e) and ends in chunk c = (e - 1) // T. Its tail is the part inside
that chunk, tokens [max(s, cT), e), and its final state is

    h_i = exp(Σ_{k ∈ tail} a_k) H_c [if H_c is its own] + Σ_{t ∈ tail} exp(Σ_{t<k<e} a_k) Δ_t x_t ⊗ B_t

with a_k = Δ_k A and H_c the state entering chunk c. H_c is the sequence's own
state when the sequence started before chunk c (token cT - 1 is its), or when
c = 0 and s = 0 (H_0 is ``initial_states``, which belong to the sequence holding
token 0); otherwise it is an earlier sequence's. The decays are sums over at most
one chunk, as in the kernels, each summed directly (no difference of prefix sums).

Cost: each sequence's tail is gathered, padded to the longest,
(num_seqs, W, nheads, headdim) with W <= chunk_size. Differentiable: gradients
reach x, dt, A, B and dt_bias here and, through H, the scan's backward.
"""

from __future__ import annotations

import torch

from lnlm_ssm.ops.ssd.reference import discretise_dt


def varlen_states(entering, x, dt, A, B, cu_seqlens, chunk_size, dt_bias, dt_softplus, dt_limit):
    """(num_seqs, nheads, headdim, dstate) in ``entering``'s dtype.

    ``entering``: (nchunks, nheads, headdim, dstate), the state entering each chunk
    of the one row; x, dt, B (1, seqlen, ...) and the rest as the scan took them.
    """
    compute = entering.dtype
    seqlen, ngroups = x.shape[1], B.shape[2]
    offsets = cu_seqlens.to(device=x.device, dtype=torch.long)
    starts, ends = offsets[:-1], offsets[1:]
    if seqlen == 0:  # every sequence is empty (and a scan may have no chunk to index)
        return entering.new_zeros(len(starts), *entering.shape[1:])
    chunk = (ends - 1).clamp(min=0) // chunk_size
    tail_start = torch.maximum(starts, chunk * chunk_size)
    tail_len = ends - tail_start  # 0 for an empty sequence
    steps = torch.arange(int(tail_len.max()), device=x.device)
    in_tail = steps < tail_len[:, None]  # (s, W)
    token = (tail_start[:, None] + steps).clamp(max=seqlen - 1)  # padding reads a real token, weighted 0

    delta = discretise_dt(dt[0, token], dt_bias, dt_softplus, dt_limit, compute) * in_tail[..., None]  # (s, W, h)
    a = delta * A.to(compute)
    through = a.flip(1).cumsum(1).flip(1)  # [j] = Σ_{k≥j} a_k, to the end of the tail
    after = torch.cat([through[:, 1:], torch.zeros_like(through[:, :1])], dim=1)  # [j] = Σ_{k>j} a_k
    weight = (torch.exp(after) * delta).unflatten(-1, (ngroups, -1))  # (s, W, g, r)
    xs = x[0, token].to(compute).unflatten(2, (ngroups, -1))  # (s, W, g, r, p)
    own = torch.einsum("swgr,swgrp,swgn->sgrpn", weight, xs, B[0, token].to(compute)).flatten(1, 2)

    carried = ((starts < chunk * chunk_size) | (starts == 0)) & (tail_len > 0)
    decay = torch.exp(a.sum(1)) * carried[:, None]  # (s, h)
    return own + decay[..., None, None] * entering[chunk]
