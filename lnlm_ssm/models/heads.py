"""Heads: from the backbone's hidden states to a task's outputs, and each head's loss.

- the LM head: logits over the vocabulary, through ``decode_linear`` (the few
  rows of a decode step are its fast case; ``weight_only_linear`` for a
  quantised head), and the next-token loss.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

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
