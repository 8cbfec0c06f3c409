"""Heads: from the backbone's hidden states to a task's outputs, and each head's loss.

- the LM head: logits over the vocabulary, through ``decode_linear`` (the few
  rows of a decode step are its fast case; ``weight_only_linear`` for a
  quantised head), and the next-token loss;
- the encoders' heads (``MaskedLMHead``, ``ReplacedTokenHead``) and their losses:
  masked-token cross entropy and ELECTRA's replaced-token BCE.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lnlm_ssm.layers.mlp import activation_fn
from lnlm_ssm.layers.norm import LayerNorm
from lnlm_ssm.layers.quantized import project
from lnlm_ssm.utils.dtypes import math_dtype

IGNORE_INDEX = -100


def lm_logits(hidden_states: torch.Tensor, head: nn.Module, vocab_size: int, backend: str) -> torch.Tensor:
    """Logits (..., vocab_size) of ``hidden_states`` (..., d_model) under ``head`` (d_model -> padded_vocab, no bias).

    ``head``: an ``nn.Linear`` or its quantised ``QuantizedLinear``.
    """
    # The padded vocab rows are never a token: skip them in the matmul rather than slice afterwards.
    return project(head, hidden_states, backend, out_features=vocab_size)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross entropy of ``logits[:, :-1]`` against ``labels[:, 1:]``: position t predicts token t + 1.

    ``labels`` (batch, seqlen) are the inputs themselves, not shifted; -100 and
    positions where ``mask`` (batch, seqlen) is False are ignored.
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape (batch, seqlen) = {tuple(logits.shape[:2])}; got {tuple(labels.shape)}")
    labels = labels.to(logits.device)
    if mask is not None:
        labels = labels.masked_fill(~mask, IGNORE_INDEX)
    # At least fp32 (bf16 logits lose too much in the log-softmax); float64 stays float64.
    logits = logits[:, :-1].flatten(0, 1)
    logits = logits.to(math_dtype(logits.dtype))
    return F.cross_entropy(logits, labels[:, 1:].flatten().long(), ignore_index=IGNORE_INDEX)


def _check_labels(labels: torch.Tensor, shape: tuple, what: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.shape != shape:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape (batch, seqlen) = {shape} ({what}); got {got}")


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of ``logits`` (batch, seqlen, vocab) against ``labels`` (batch, seqlen), unshifted.

    HF's convention: ``labels`` hold the original ids at the masked positions and
    -100 everywhere else (NaN when no position is labelled, as torch's mean of nothing).
    """
    _check_labels(labels, tuple(logits.shape[:2]), "the original ids where masked, -100 elsewhere")
    logits = logits.flatten(0, 1)
    logits = logits.to(math_dtype(logits.dtype))
    return F.cross_entropy(logits, labels.to(logits.device).flatten().long(), ignore_index=IGNORE_INDEX)


def replaced_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean binary cross entropy of per-token ``logits`` (batch, seqlen) against ``labels`` (1 = replaced, 0 = original).

    Positions labelled -100, and padding (``mask`` False) when a mask is given, are ignored.
    """
    _check_labels(labels, tuple(logits.shape), "1 where replaced, 0 where original, -100 to ignore")
    labels = labels.to(logits.device)
    keep = labels != IGNORE_INDEX
    if mask is not None:
        keep = keep & mask.to(device=logits.device, dtype=torch.bool)
    logits = logits.to(math_dtype(logits.dtype))
    return F.binary_cross_entropy_with_logits(logits[keep], labels[keep].to(logits.dtype))


class MaskedLMHead(nn.Module):
    """BERT's MLM head: ``decoder(norm(act(dense(h))))``; ``decoder`` (dim -> vocab_size, with bias) is the one
    the model ties to its token embedding. ``dim``: the embedding width (ALBERT's and ELECTRA's E, else d_model)."""

    def __init__(
        self, d_model: int, dim: int, vocab_size: int, activation: str, eps: float, *, factory: dict, backend: str
    ) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, dim, **factory)
        self.activation = activation_fn(activation)
        self.norm = LayerNorm(dim, eps=eps, backend=backend, **factory)
        self.decoder = nn.Linear(dim, vocab_size, **factory)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.activation(self.dense(hidden_states))))


class ReplacedTokenHead(nn.Module):
    """ELECTRA's discriminator head: one logit per token, ``out(act(dense(h)))`` (batch, seqlen, d) -> (batch, seqlen)."""

    def __init__(self, d_model: int, activation: str, *, factory: dict) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model, **factory)
        self.activation = activation_fn(activation)
        self.out = nn.Linear(d_model, 1, **factory)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out(self.activation(self.dense(hidden_states))).squeeze(-1)
