"""T5's span corruption (Raffel et al. 2020, section 3.1.4): spans of the input are replaced by sentinels,
and the target spells them out.

For a sequence of L tokens, with ``noise_density`` d (0.15) and ``mean_noise_span_length`` m (3):

1. n = round(L * d) noise tokens, at least 1 and at most L - 1, in s = round(n / m) spans
   (at least 1, and no more than there are noise tokens or kept tokens);
2. the n noise tokens are split into s spans and the L - n kept tokens into s runs, every
   part of length >= 1 and every such split equally likely; the sequence is run, span,
   run, span, ..., so it starts with kept tokens and ends with a span;
3. ``inputs``: the kept tokens, span i replaced by sentinel i, then eos;
   ``targets``: sentinel i followed by span i, for every span, then eos.

Sentinel i is ``first_sentinel_id - i``: T5's ``<extra_id_0>`` is the top of its
vocabulary and the others count down from it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from lnlm_ssm.utils.checks import check_nonnegative_int, check_positive_int

__all__ = ["CorruptedSpans", "SpanCorruptionCollator", "random_spans_noise_mask", "span_corrupt"]

IGNORE_INDEX = -100


class CorruptedSpans(NamedTuple):
    """``inputs``: the encoder's ids; ``targets``: the decoder's labels (1-D each)."""

    inputs: torch.Tensor
    targets: torch.Tensor


def _check_noise(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0 < noise_density < 1:
        raise ValueError(f"noise_density must be in (0, 1); got {noise_density!r}")
    if not mean_noise_span_length >= 1:
        raise ValueError(f"mean_noise_span_length must be >= 1; got {mean_noise_span_length!r}")


def _random_lengths(total: int, parts: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``parts`` positive lengths summing to ``total``, each such composition equally likely."""
    cuts = torch.randperm(total - 1, generator=generator)[: parts - 1].sort().values + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([total])])
    return bounds.diff()


def random_spans_noise_mask(
    length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    *,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Bool (length,): True at the noise tokens of steps 1-2 of the module docstring. ``length`` >= 2."""
    check_positive_int("length", length)
    if length < 2:
        raise ValueError(f"length must be >= 2 (a sequence needs a kept token and a noise token); got {length}")
    _check_noise(noise_density, mean_noise_span_length)
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(1, min(round(noise / mean_noise_span_length), noise, length - noise))
    noise_lengths = _random_lengths(noise, spans, generator)
    kept_lengths = _random_lengths(length - noise, spans, generator)
    # Run, span, run, span, ...: alternate the two, kept first.
    interleaved = torch.stack([kept_lengths, noise_lengths], dim=1).flatten()
    is_noise = torch.tensor([False, True]).repeat(spans)
    return is_noise.repeat_interleave(interleaved)


def span_corrupt(
    ids: Union[torch.Tensor, Sequence[int]],
    *,
    first_sentinel_id: int,
    eos_token_id: int,
    num_sentinels: int = 100,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    generator: Optional[torch.Generator] = None,
) -> CorruptedSpans:
    """``inputs`` and ``targets`` of one sequence of ``ids`` (1-D), as the module docstring describes.

    ``num_sentinels`` (T5: 100) bounds the spans of one sequence: a sequence that needs
    more is an error (shorten it, or lower ``noise_density``).
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim != 1:
        raise ValueError(f"ids must be one sequence (1-D); got shape {tuple(ids.shape)}")
    check_nonnegative_int("eos_token_id", eos_token_id)
    check_positive_int("num_sentinels", num_sentinels)
    if not isinstance(first_sentinel_id, int) or first_sentinel_id - num_sentinels + 1 < 0:
        raise ValueError(
            f"first_sentinel_id must be an int >= num_sentinels - 1 = {num_sentinels - 1} (sentinels count down "
            f"from it); got {first_sentinel_id!r}"
        )
    noise = random_spans_noise_mask(len(ids), noise_density, mean_noise_span_length, generator=generator)
    # A span starts where noise follows a kept token (the first token is always kept).
    starts = noise & ~torch.cat([torch.tensor([False]), noise[:-1]])
    spans = int(starts.sum())
    if spans > num_sentinels:
        raise ValueError(
            f"a sequence of {len(ids)} tokens has {spans} noise spans but only num_sentinels={num_sentinels} "
            "sentinels exist: shorten the sequences or lower noise_density"
        )
    sentinels = first_sentinel_id - (starts.long().cumsum(0) - 1)
    eos = torch.tensor([eos_token_id])
    # Each span's first position takes its sentinel and the rest of the span is dropped.
    inputs = torch.where(starts, sentinels, ids)[~noise | starts]
    # The targets: each noise token, its span's sentinel before it where a span starts.
    pairs = torch.stack([sentinels, ids], dim=1)[noise]
    targets = pairs[torch.stack([starts, torch.ones_like(starts)], dim=1)[noise]]
    return CorruptedSpans(torch.cat([inputs, eos]), torch.cat([targets, eos]))


class SpanCorruptionCollator:
    """Sequences -> a batch for ``Seq2SeqLM``: ``input_ids`` and ``attention_mask`` (padded on the right with
    ``pad_token_id``) and ``labels`` (padded with -100; the model shifts them right itself).

    Each sequence is corrupted afresh at every call (``span_corrupt``, with this
    collator's arguments), drawing from ``generator``.
    """

    def __init__(
        self,
        *,
        first_sentinel_id: int,
        eos_token_id: int,
        pad_token_id: int,
        num_sentinels: int = 100,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        check_nonnegative_int("pad_token_id", pad_token_id)
        _check_noise(noise_density, mean_noise_span_length)
        self.kwargs = dict(
            first_sentinel_id=first_sentinel_id,
            eos_token_id=eos_token_id,
            num_sentinels=num_sentinels,
            noise_density=noise_density,
            mean_noise_span_length=mean_noise_span_length,
        )
        self.pad_token_id = pad_token_id
        self.generator = generator

    def __call__(self, sequences: Union[torch.Tensor, Sequence[Sequence[int]]]) -> dict[str, torch.Tensor]:
        corrupted = [span_corrupt(seq, generator=self.generator, **self.kwargs) for seq in sequences]
        if not corrupted:
            raise ValueError("sequences must hold at least one sequence")
        inputs = _pad([c.inputs for c in corrupted], self.pad_token_id)
        return {
            "input_ids": inputs,
            "attention_mask": _pad([torch.ones_like(c.inputs) for c in corrupted], 0),
            "labels": _pad([c.targets for c in corrupted], IGNORE_INDEX),
        }


def _pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
