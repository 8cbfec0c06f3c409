"""XLNet's two-stream relative attention: a content stream ``h`` and a query stream ``g`` over the same keys.

Notation (Dai et al. 2019, Transformer-XL; Yang et al. 2019, XLNet): a query at
position i and a key at position j score

    score(i, j) = [(q_i + u)·k_j  +  (q_i + v)·R_{i-j}  +  (q_i + s)·S_{ij}] / sqrt(d_head)

with ``u = r_w_bias`` (content bias), ``v = r_r_bias`` (position bias), ``R_d``
the projection (``r``) of the sinusoid of the relative distance d, ``s =
r_s_bias`` and ``S_ij = seg_embed[0]`` when i and j lie in the same segment,
``seg_embed[1]`` otherwise. Keys and values always come from the content stream
(and the memory before it); the content stream's queries come from ``h``, the
query stream's from ``g``, which carries a position but never its own token.

Parameter names are HF ``XLNetRelativeAttention``'s (``q, k, v, o, r`` of shape
(d_model, n_head, d_head), the three biases (n_head, d_head), ``seg_embed`` (2,
n_head, d_head), ``layer_norm``), so its checkpoints load without renaming.
Tensors are batch-first: (batch, seqlen, d_model).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lnlm_ssm.layers.norm import LayerNorm
from lnlm_ssm.utils.checks import check_positive_int
from lnlm_ssm.utils.dtypes import math_dtype

# What a masked score becomes. Finite on purpose, as in the original: a query
# that may see no key at all (the first of a factorisation order without
# memory) gets uniform weights instead of NaN.
_MASKED_SCORE = -1e30


def relative_sinusoid(qlen: int, klen: int, d_model: int, clamp_len: int, *, device, dtype) -> torch.Tensor:
    """Sinusoids (qlen + klen, d_model) of the relative distances klen, klen - 1, ..., 1 - qlen.

    Row p holds distance ``klen - p``, as ``[sin(d·f), cos(d·f)]`` with the
    frequencies ``f_k = 10000^(-2k/d_model)``; ``clamp_len > 0`` clamps |d| to it.
    """
    distances = torch.arange(klen, -qlen, -1.0, device=device, dtype=torch.float32)
    if clamp_len > 0:
        distances = distances.clamp(-clamp_len, clamp_len)
    freq = 1.0 / 10000 ** (torch.arange(0, d_model, 2.0, device=device, dtype=torch.float32) / d_model)
    angles = distances[:, None] * freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


class TwoStreamRelativeAttention(nn.Module):
    """Post-norm relative multi-head attention of the content stream and (optionally) the query stream.

    ``forward(h, g, pos_emb, *, mask_h, mask_g, seg_mat, mems, target_mapping)``:

    - ``h`` (batch, qlen, d_model): the content stream; ``mems`` (batch, mlen,
      d_model) or None: the earlier segment's content, prepended to the keys;
    - ``g`` (batch, num_predict, d_model) or None: the query stream, one row per
      prediction; ``target_mapping`` (batch, num_predict, qlen) places prediction
      k at the position(s) where it is 1 (g is scattered there, attends, and is
      gathered back);
    - ``pos_emb`` (qlen + klen, d_model): ``relative_sinusoid``;
    - ``mask_h``, ``mask_g`` (batch, qlen, klen) bool or None: True where query i
      may not see key j (``mask_h`` lets each position see itself);
    - ``seg_mat`` (batch, qlen, klen) bool or None: True where i and j lie in
      different segments.

    Returns ``(h, g)``, each ``LayerNorm(stream + attention output)``.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_head: int,
        *,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.0,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("n_head", n_head), ("d_head", d_head)):
            check_positive_int(name, value)
        factory = {"device": device, "dtype": dtype}
        self.n_head, self.d_head = n_head, d_head
        self.scale = d_head**-0.5
        for name in ("q", "k", "v", "o", "r"):
            setattr(self, name, nn.Parameter(torch.empty(d_model, n_head, d_head, **factory)))
        for name in ("r_w_bias", "r_r_bias", "r_s_bias"):
            setattr(self, name, nn.Parameter(torch.empty(n_head, d_head, **factory)))
        self.seg_embed = nn.Parameter(torch.empty(2, n_head, d_head, **factory))
        self.layer_norm = LayerNorm(d_model, eps=layer_norm_eps, backend=backend, **factory)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Every projection, bias and segment embedding ~ N(0, std) (XLNet's initialisation); the norm at 1 / 0."""
        for param in (self.q, self.k, self.v, self.o, self.r, self.r_w_bias, self.r_r_bias, self.r_s_bias):
            nn.init.normal_(param, std=std)
        nn.init.normal_(self.seg_embed, std=std)
        self.layer_norm.reset_parameters()

    def forward(
        self,
        h: torch.Tensor,
        g: Optional[torch.Tensor],
        pos_emb: torch.Tensor,
        *,
        mask_h: Optional[torch.Tensor] = None,
        mask_g: Optional[torch.Tensor] = None,
        seg_mat: Optional[torch.Tensor] = None,
        mems: Optional[torch.Tensor] = None,
        target_mapping: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        context = h if mems is None else torch.cat([mems, h], dim=1)
        key = torch.einsum("bjh,hnd->bjnd", context, self.k)
        value = torch.einsum("bjh,hnd->bjnd", context, self.v)
        key_pos = torch.einsum("ph,hnd->pnd", pos_emb.to(h.dtype), self.r)

        query_h = torch.einsum("bih,hnd->bind", h, self.q)
        out_h = self._post(h, self._attend(query_h, key, value, key_pos, seg_mat, mask_h))
        if g is None:
            return out_h, None
        query_g = torch.einsum("bkh,hnd->bknd", g, self.q)
        if target_mapping is not None:
            query_g = torch.einsum("bknd,bki->bind", query_g, target_mapping.to(query_g.dtype))
        attended = self._attend(query_g, key, value, key_pos, seg_mat, mask_g)
        if target_mapping is not None:
            attended = torch.einsum("bind,bki->bknd", attended, target_mapping.to(attended.dtype))
        return out_h, self._post(g, attended)

    def _attend(self, query, key, value, key_pos, seg_mat, mask) -> torch.Tensor:
        """Attention vectors (batch, qlen, n_head, d_head) of ``query`` over ``key``/``value`` (batch, klen, ...)."""
        dtype = math_dtype(query.dtype)
        query, key, key_pos = query.to(dtype), key.to(dtype), key_pos.to(dtype)
        qlen, klen = query.shape[1], key.shape[1]
        content = torch.einsum("bind,bjnd->bnij", query + self.r_w_bias.to(dtype), key)
        # Score against every distance, then pick for (i, j) the row of distance (klen - qlen + i) - j:
        # row p of pos_emb holds distance klen - p, so p = qlen - i + j.
        by_distance = torch.einsum("bind,pnd->bnip", query + self.r_r_bias.to(dtype), key_pos)
        rows = torch.arange(qlen, device=query.device)[:, None]
        cols = torch.arange(klen, device=query.device)[None, :]
        index = (qlen - rows + cols).expand(query.shape[0], self.n_head, qlen, klen)
        scores = content + by_distance.gather(3, index)
        if seg_mat is not None:
            # (q + s)·seg_embed[c] for both classes c, then the class of each (i, j).
            per_class = torch.einsum("bind,cnd->bnic", query + self.r_s_bias.to(dtype), self.seg_embed.to(dtype))
            different = seg_mat[:, None].to(dtype)
            scores = scores + per_class[..., :1] * (1 - different) + per_class[..., 1:] * different
        scores = scores * self.scale
        if mask is not None:
            scores = scores.masked_fill(mask[:, None], _MASKED_SCORE)
        weights = self.dropout(scores.softmax(dim=-1))
        return torch.einsum("bnij,bjnd->bind", weights, value.to(dtype)).to(value.dtype)

    def _post(self, stream: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        out = self.dropout(torch.einsum("bind,hnd->bih", attended, self.o))
        return self.layer_norm(out, residual=stream)
