"""Inference caches: each layer's state (allocated once by its ``allocate_cache``, updated in place),
and ``InferenceCache``, a whole model's: every layer's state plus the padding mask seen so far.

Shapes (see the mixer contract in ``lnlm_ssm.layers``):

- ``MambaCache``: conv_state (batch, d_inner, d_conv), ssm_state (batch, d_inner, d_state);
- ``Mamba2Cache``: conv_state (batch, conv_dim, d_conv), ssm_state (batch, nheads, headdim, d_state);
- ``AttentionCache``: k, v (batch, max_seqlen, num_heads_kv, head_dim);
- ``CrossAttentionCache``: k, v (batch, memory_len, num_heads, head_dim), mask (batch, memory_len);
- ``Seq2SeqCache``: a decoder's, every layer's self-mixer cache and cross-attention memory.

A conv_state holds the last d_conv inputs of the causal conv, newest last, which
is the layout ``causal_conv1d_update`` reads and writes. ``seqlen`` counts the
positions the cache has seen (padding included), so a layer knows ``past``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch


class _LayerCache:
    """reset / reorder / write shared by the cache dataclasses: they act on every tensor field.

    ``track_grad`` (set by ``InferenceCache(track_grad=True)``): the layers ``write`` new states by rebinding
    them with their autograd graph instead of copying them in, detached, so that a forward continued from
    this cache differentiates through the positions the cache has seen (training on a shared prefix).
    """

    track_grad = False

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor of this cache."""
        return [
            value
            for value in (getattr(self, f.name) for f in dataclasses.fields(self))
            if isinstance(value, torch.Tensor)
        ]

    @property
    def batch_size(self) -> int:
        return self.tensors()[0].shape[0]

    def reset(self) -> None:
        """Zero every state in place and forget the positions seen."""
        for tensor in self.tensors():
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
        for tensor in self.tensors():
            # index_select makes a copy first, so repeated or permuted rows read the old values.
            tensor.copy_(tensor.index_select(0, batch_index.to(tensor.device)))

    def write(self, name: str, value: torch.Tensor, start: Optional[int] = None) -> None:
        """Set the state ``name`` to ``value``, or (``start`` given) its positions ``start:start + len`` (dim 1).

        In place: a whole state detached (the scans saved the old one for their backward), positions as given
        (attention reads them back in the same forward). With ``track_grad``, out of place, keeping the graph.
        """
        old = getattr(self, name)
        if start is not None:
            if self.track_grad:
                end = start + value.shape[1]
                value = torch.cat([old[:, :start], value.to(old.dtype), old[:, end:]], dim=1)
            else:
                old[:, start : start + value.shape[1]] = value
                return
        if self.track_grad:
            setattr(self, name, value.to(old.dtype))
        else:
            old.copy_(value.detach())

    def select(self, batch_index: torch.Tensor) -> "_LayerCache":
        """A new cache of rows ``batch_index`` (rows may repeat), out of place: gradients flow back to this one."""
        fields = {
            f.name: value.index_select(0, batch_index.to(value.device))
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        selected = dataclasses.replace(self, **fields)
        selected.track_grad = self.track_grad
        return selected


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


class InferenceCache:
    """Every layer's inference state, allocated once, plus the attention mask seen so far.

    ``layers[i]`` is the object layer i's ``allocate_cache`` returned. ``seqlen`` counts
    the positions seen (padding included). The mask of those positions is kept only
    once some padding was given (``mask`` is None while every position was real), in a
    buffer of ``max_seqlen`` columns so that decoding appends without copying.
    """

    def __init__(
        self, layers: list, batch_size: int, max_seqlen: int, device: torch.device, *, track_grad: bool = False
    ) -> None:
        self.layers = list(layers)
        # See _LayerCache: a training forward through this cache keeps the graph of the states it writes.
        self.track_grad = track_grad
        for layer in self.layers:
            layer.track_grad = track_grad
        self.batch_size = batch_size
        self.max_seqlen = max_seqlen
        self.device = torch.device(device)
        self.seqlen = 0
        self._mask_buffer: Optional[torch.Tensor] = None

    @property
    def mask(self) -> Optional[torch.Tensor]:
        """(batch, seqlen) bool mask of the positions seen, or None when all were real."""
        return None if self._mask_buffer is None else self._mask_buffer[:, : self.seqlen]

    def mask_with(self, new_mask: Optional[torch.Tensor], seqlen: int) -> Optional[torch.Tensor]:
        """Record the mask of ``seqlen`` new positions (None: all real) and return the mask of past + new.

        Does not advance ``seqlen``; ``advance`` does, once the forward has run.
        """
        if new_mask is None and self._mask_buffer is None:
            return None
        if self._mask_buffer is None:
            # Positions before the first padding were all real; columns not yet written stay True
            # so that decoding, whose tokens are always real, has nothing to write.
            self._mask_buffer = torch.ones(self.batch_size, self.max_seqlen, dtype=torch.bool, device=self.device)
        end = self.seqlen + seqlen
        if new_mask is not None:
            self._mask_buffer[:, self.seqlen : end] = new_mask
        return self._mask_buffer[:, :end]

    def select(self, batch_index: torch.Tensor) -> "InferenceCache":
        """A new cache of rows ``batch_index`` (rows may repeat, the batch may grow), out of place: DPO runs a
        prompt once and continues both completions from its rows."""
        layers = [layer.select(batch_index) for layer in self.layers]
        selected = InferenceCache(
            layers, len(batch_index), self.max_seqlen, self.device, track_grad=self.track_grad
        )
        selected.seqlen = self.seqlen
        if self._mask_buffer is not None:
            selected._mask_buffer = self._mask_buffer.index_select(0, batch_index.to(self.device))
        return selected

    def advance(self, seqlen: int) -> None:
        self.seqlen += seqlen

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor of every layer (the mask buffer excluded)."""
        return [tensor for layer in self.layers for tensor in layer.tensors()]

    def set_seqlen(self, seqlen: int) -> None:
        """Set the position count of this cache and of every layer cache (after a step that bypasses the
        layers' forward: a CUDA graph replay, a fused decode step)."""
        self.seqlen = seqlen
        for layer in self.layers:
            layer.seqlen = seqlen

    def reset(self) -> None:
        """Zero every state in place and forget the positions and the mask seen."""
        for layer in self.layers:
            layer.reset()
        self.seqlen = 0
        self._mask_buffer = None


@dataclass
class CrossAttentionCache(_LayerCache):
    """The memory a cross-attention layer reads, projected once: k, v (batch, memory_len, num_heads, head_dim),
    and ``mask`` (batch, memory_len) bool, False at padded memory positions (None: all real).

    ``CrossAttention.memory`` writes it; decoding only reads it (``reorder`` serves beam search).
    """

    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor] = None


class Seq2SeqCache:
    """A decoder's inference state: each layer's self-mixer cache (``layers``) and cross-attention memory (``cross``).

    ``seqlen`` counts the decoder positions seen; ``max_seqlen`` is the room the
    self-mixer caches were allocated with.
    """

    def __init__(self, layers: list, cross: list[CrossAttentionCache], max_seqlen: int) -> None:
        if len(layers) != len(cross):
            raise ValueError(
                f"one self-mixer cache and one cross-attention memory per layer; got {len(layers)} and {len(cross)}"
            )
        self.layers = list(layers)
        self.cross = list(cross)
        self.max_seqlen = max_seqlen
        self.seqlen = 0

    @property
    def batch_size(self) -> int:
        return self.cross[0].batch_size

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor of every layer, memories included."""
        return [tensor for layer in self.layers + self.cross for tensor in layer.tensors()]

    def advance(self, seqlen: int) -> None:
        self.seqlen += seqlen

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Rows ``batch_index`` become the new batch, in every cache and memory, in place (beam search)."""
        for layer in self.layers + self.cross:
            layer.reorder(batch_index)
