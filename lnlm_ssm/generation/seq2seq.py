"""The decode loop of ``Seq2SeqLM.generate``: the encoder runs once, then the decoder token by token.

1. ``model.encode(input_ids, attention_mask)``, once;
2. ``model.allocate_cache(encoder_hidden_states, max_new_tokens, attention_mask=...)``: every
   decoder layer's cross-attention keys and values are computed there, once, and its
   self-mixer's cache (attention KV, or Mamba's conv and SSM state) is allocated;
3. from the decoder start token, ``model.decode_step(tokens (batch, 1), cache)`` per new token.

The result holds the decoder's ids, the start token first, as HF transformers
returns them: (batch, 1 + new). A row that emitted ``eos_token_id`` is padded with
the model's ``pad_token_id`` after it, and generation stops once every row has.

Beam search (``num_beams > 1``) keeps, per row, the ``num_beams`` best prefixes by
summed log-probability; a prefix ending in eos becomes a finished hypothesis,
scored ``sum of log-probs / length ** length_penalty`` where length counts the
generated tokens, eos included (``length_penalty`` 0: the plain sum). A row is done
once it has ``num_beams`` hypotheses and no running prefix can beat the worst of
them; at ``max_new_tokens`` the running prefixes become hypotheses too. The best
hypothesis of each row is returned, padded after its eos with ``pad_token_id``.
These are HF transformers' rules (with its default ``early_stopping=False``), and
its beam search returns the same ids but for the padding: it fills with
``pad_token_id or eos_token_id``, which is eos for T5's pad 0.

This module imports no model: it calls ``encode``, ``allocate_cache`` and
``decode_step`` and reads ``model.config``'s token ids; the cache has ``reorder``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from lnlm_ssm.generation.decode import _check_sampling_args
from lnlm_ssm.generation.sampling import sample_next_token

__all__ = ["generate"]


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    attention_mask: Optional[torch.Tensor] = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eos_token_id: Union[int, None, str] = "config",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Decoder ids (batch, 1 + up to ``max_new_tokens``) for the source ``input_ids`` (batch, source_len).

    - ``attention_mask`` (batch, source_len): 1 real, 0 padding (T5 pads on the right).
    - ``temperature`` 0 (the default, as T5's) or ``top_k=1``: greedy; otherwise sampled
      after ``top_k`` then ``top_p`` filtering, from ``generator``.
    - ``num_beams > 1``: beam search (greedy per beam; the sampling arguments must keep
      their defaults), with ``length_penalty`` (see the module docstring).
    - ``eos_token_id``: "config" (the default): the model's ``config.eos_token_id``; None: none,
      every row gets ``max_new_tokens``.
    """
    _check_sampling_args(max_new_tokens, temperature, top_k, top_p, 1.0)
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1 (1: no beam search); got {num_beams!r}")
    if num_beams > 1 and (temperature != 0 or top_k != 0 or top_p != 1.0):
        raise ValueError(
            "beam search is deterministic: with num_beams > 1 leave temperature=0, top_k=0 and top_p=1; got "
            f"temperature={temperature!r}, top_k={top_k!r}, top_p={top_p!r}"
        )
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite float; got {length_penalty!r}")
    config = model.config
    if eos_token_id == "config":
        eos = config.eos_token_id
    elif eos_token_id is None or (isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool)):
        eos = eos_token_id
    else:
        raise ValueError(f"eos_token_id must be a token id, None (no eos) or 'config'; got {eos_token_id!r}")
    encoded = model.encode(input_ids, attention_mask)  # checks input_ids and the mask
    batch = input_ids.shape[0]
    start = torch.full((batch, 1), config.decoder_start_token_id, dtype=input_ids.dtype, device=input_ids.device)
    if max_new_tokens == 0:
        return start
    if num_beams > 1:
        return _beam_search(
            model, encoded, attention_mask, start, num_beams, max_new_tokens, length_penalty, eos, config.pad_token_id
        )
    cache = model.allocate_cache(encoded, max_new_tokens, attention_mask=attention_mask)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens = [start[:, 0]]
    for _ in range(max_new_tokens):
        logits = model.decode_step(tokens[-1][:, None], cache)[:, -1]
        token = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        token = token.to(input_ids.dtype)
        if eos is not None:
            token = token.masked_fill(finished, config.pad_token_id)
            finished |= token == eos
        tokens.append(token)
        if eos is not None and finished.all():
            break
    return torch.stack(tokens, dim=1)


def _beam_search(model, encoded, attention_mask, start, num_beams, max_new_tokens, length_penalty, eos, pad):
    batch, beams = start.shape[0], num_beams
    device = start.device
    encoded = encoded.repeat_interleave(beams, dim=0)
    mask = None if attention_mask is None else attention_mask.repeat_interleave(beams, dim=0)
    cache = model.allocate_cache(encoded, max_new_tokens, attention_mask=mask)
    # Every beam starts as the same prefix: only the first may expand, or the beams would repeat it.
    scores = torch.full((batch, beams), -math.inf, device=device)
    scores[:, 0] = 0.0
    sequences = start.repeat_interleave(beams, dim=0)
    hypotheses: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(max_new_tokens):
        logits = model.decode_step(sequences[:, -1:], cache)[:, -1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        vocab = log_probs.shape[-1]
        candidates = (scores.reshape(-1, 1) + log_probs).reshape(batch, beams * vocab)
        # 2 * beams candidates leave `beams` that do not end in eos even if `beams` of them do.
        top_scores, top_index = candidates.topk(min(2 * beams, beams * vocab), dim=1)
        rows, tokens, new_scores = [], [], []
        for b in range(batch):
            running = []
            if not done[b]:
                for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                    if score == -math.inf or len(running) == beams:
                        break
                    source, token = b * beams + index // vocab, index % vocab
                    if token == eos:
                        # As HF: an eos counts only among the best `beams` candidates.
                        if rank < beams:
                            ended = torch.cat([sequences[source], sequences.new_tensor([token])])
                            _add(hypotheses[b], beams, score / (step + 1) ** length_penalty, ended)
                    else:
                        running.append((score, source, token))
                if len(hypotheses[b]) == beams and (
                    not running
                    or hypotheses[b][-1][0] >= _best_possible(running[0][0], step + 2, max_new_tokens, length_penalty)
                ):
                    done[b] = True
            # Finished rows and missing beams keep a row in the batch that can never win.
            running += [(-math.inf, b * beams, pad)] * (beams - len(running))
            for score, source, token in running:
                rows.append(source)
                tokens.append(token)
                new_scores.append(score)
        if all(done):
            break
        index = torch.tensor(rows, device=device)
        new_tokens = torch.tensor(tokens, device=device, dtype=sequences.dtype)[:, None]
        sequences = torch.cat([sequences[index], new_tokens], dim=1)
        scores = torch.tensor(new_scores, device=device).reshape(batch, beams)
        if step + 1 < max_new_tokens:
            cache.reorder(index)
    else:
        for b in range(batch):
            if not done[b]:
                for j in range(beams):
                    if scores[b, j] > -math.inf:
                        score = scores[b, j].item() / max_new_tokens**length_penalty
                        _add(hypotheses[b], beams, score, sequences[b * beams + j])
    best = [max(h, key=lambda item: item[0])[1] for h in hypotheses]
    width = max(len(seq) for seq in best)
    out = torch.full((batch, width), pad, dtype=start.dtype, device=device)
    for b, seq in enumerate(best):
        out[b, : len(seq)] = seq
    return out


def _add(hypotheses: list, beams: int, score: float, sequence: torch.Tensor) -> None:
    """Keep the ``beams`` best (score, sequence) pairs, best first."""
    hypotheses.append((score, sequence))
    hypotheses.sort(key=lambda item: -item[0])
    del hypotheses[beams:]


def _best_possible(score: float, shortest: int, longest: int, length_penalty: float) -> float:
    """The best final score a running prefix with summed log-prob ``score`` (<= 0) can still reach.

    Its sum can only fall; its length will be between ``shortest`` and ``longest``.
    Dividing a negative sum by length**p raises it most at the longest length for
    p > 0, at the shortest for p <= 0.
    """
    length = longest if length_penalty > 0 else shortest
    return score / min(length, longest) ** length_penalty
