"""Per-layer inference caches: tensors allocated once by a mixer's ``allocate_cache``, updated in place.

Shapes (see the mixer contract in ``lnlm_ssm.layers``):

- ``MambaCache``: conv_state (batch, d_inner, d_conv), ssm_state (batch, d_inner, d_state);
- ``Mamba2Cache``: conv_state (batch, conv_dim, d_conv), ssm_state (batch, nheads, headdim, d_state);
- ``AttentionCache``: k, v (batch, max_seqlen, num_heads_kv, head_dim).

A conv_state holds the last d_conv inputs of the causal conv, newest last, which
is the layout ``causal_conv1d_update`` reads and writes. ``seqlen`` counts the
positions the cache has seen (padding included), so a layer knows ``past``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


class _LayerCache:
    """reset / reorder shared by the cache dataclasses: they act on every tensor field, in place."""

    def _tensors(self) -> list[torch.Tensor]:
        return [
            value
            for value in (getattr(self, f.name) for f in dataclasses.fields(self))
            if isinstance(value, torch.Tensor)
        ]

    @property
    def batch_size(self) -> int:
        return self._tensors()[0].shape[0]

    def reset(self) -> None:
        """Zero every state in place and forget the positions seen."""
        for tensor in self._tensors():
            tensor.zero_()
        self.seqlen = 0

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Rows ``batch_index`` become the new batch, in place (beam search keeps its survivors this way).

        ``batch_index``: (batch,) integer tensor of row indices; rows may repeat.
        """
        if not isinstance(batch_index, torch.Tensor) or batch_index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"batch_index must be an int32/int64 tensor; got {batch_index!r}")
        if batch_index.shape != (self.batch_size,):
            raise ValueError(
                f"batch_index must have shape ({self.batch_size},) (one source row per cache row); "
                f"got {tuple(batch_index.shape)}"
            )
        for tensor in self._tensors():
            # index_select makes a copy first, so repeated or permuted rows read the old values.
            tensor.copy_(tensor.index_select(0, batch_index.to(tensor.device)))


@dataclass
class MambaCache(_LayerCache):
    """Mamba-1 state: conv_state (batch, d_inner, d_conv), ssm_state (batch, d_inner, d_state) in fp32."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor
    seqlen: int = 0


@dataclass
class Mamba2Cache(_LayerCache):
    """Mamba-2 state: conv_state (batch, conv_dim, d_conv), ssm_state (batch, nheads, headdim, d_state) in fp32."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor
    seqlen: int = 0


@dataclass
class AttentionCache(_LayerCache):
    """Keys and values of the positions seen: k, v (batch, max_seqlen, num_heads_kv, head_dim); rows [:seqlen] valid."""

    k: torch.Tensor
    v: torch.Tensor
    seqlen: int = 0

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[1]
