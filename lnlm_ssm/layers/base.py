"""The mixer contract: what every sequence mixer (Mamba, Mamba2, Attention, ...) promises a model.

A model stacks mixers without knowing which is which; it relies on exactly this:

``__init__(d_model, ..., layer_idx=None, device=None, dtype=None, backend="auto")``
    Argument names as in mamba_ssm. ``backend`` is passed to every op call.

``forward(hidden_states, cache=None, *, mask=None, position_ids=None) -> Tensor``
    ``hidden_states`` (batch, seqlen, d_model) -> (batch, seqlen, d_model).

    - ``cache``: the object ``allocate_cache`` returned. Without it the layer
      runs the full-sequence (chunked) path from a zero state. With it, the
      call continues from the cached state and updates the cache in place:
      seqlen == 1 takes the single-step decode path, seqlen > 1 the chunked
      path started from the cached state (chunked prefill).
    - ``mask``: (batch, past + seqlen) with True/1 for real tokens and
      False/0 for padding, where ``past`` is the number of positions the cache
      has seen (0 without a cache). Padding is on the left. Padded positions
      must leave no trace: an SSM layer zeroes its conv input and its scan input
      at padded positions, so states stay exactly zero until the first real
      token; attention never attends to a padded key.
    - ``position_ids``: (batch, seqlen) positions for RoPE (attention only;
      SSM layers ignore it). Default: ``past + arange(seqlen)``.

    Bidirectional mixers (``BiMamba``, ``Hydra``; encoders) see the whole
    sequence at once: ``cache`` must be None, and ``mask`` (batch, seqlen) is
    right padding (BERT's batches: real tokens first). A pad reaches no state in
    either direction, so a padded row's real positions equal the row run alone;
    the outputs at pad positions are unspecified.

``allocate_cache(batch_size, max_seqlen, *, device=None, dtype=None)``
    Allocates this layer's inference state once (zeros); see ``layers.cache``.
    SSM states are kept in fp32 (float64 for float64 layers); conv states and
    KV in ``dtype``. Each cache object has ``reset()`` (zero in place) and
    counts ``seqlen``, the positions it has seen.
    A bidirectional mixer has no incremental decode: its ``allocate_cache`` raises
    NotImplementedError.

Parameter names follow mamba_ssm's checkpoint layout exactly, so that its state
dicts load without renaming.

A module also declares, by name, which of its own parameters training must treat
specially (``no_weight_decay``, ``keep_init``); :func:`declared_parameter_names`
collects the declarations of a whole model. Names survive wrapping (DDP, FSDP,
torch.compile), where attributes set on parameter tensors do not.
"""

from __future__ import annotations

import abc
from typing import Optional

import torch
from torch import nn


class Mixer(nn.Module, abc.ABC):
    """Base class of the sequence mixers; the contract is the module docstring."""

    d_model: int
    #: Own parameters that AdamW must not decay (on top of every vector, which is never decayed).
    no_weight_decay: tuple[str, ...] = ()
    #: Own parameters whose initialisation a model-level re-init must keep.
    keep_init: tuple[str, ...] = ()

    @abc.abstractmethod
    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        *,
        mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(batch, seqlen, d_model) -> (batch, seqlen, d_model)."""

    @abc.abstractmethod
    def allocate_cache(self, batch_size: int, max_seqlen: int, *, device=None, dtype=None):
        """This layer's zeroed inference state for ``batch_size`` rows and up to ``max_seqlen`` positions."""


def declared_parameter_names(model: nn.Module, declaration: str) -> set[str]:
    """Full names (as in ``model.named_parameters()``) of the parameters its modules list in ``declaration``.

    ``declaration`` is a class attribute such as ``"no_weight_decay"`` or
    ``"keep_init"``, holding names relative to the module that declares them.
    """
    names = set()
    for prefix, module in model.named_modules():
        for local in getattr(module, declaration, ()):
            names.add(f"{prefix}.{local}" if prefix else local)
    return names
