"""Text-to-text data: JSONL rows ``{"input": str, "target": str}``, tokenised for an encoder-decoder, and the
sampler that batches them.

A row that is not a JSON object, lacks a field, or has a field that is not a
non-empty string is a ``DataError`` naming the file, the line and the field; no row
is ever skipped. As T5 does, the input and the target each end with EOS (the
tokenizer's ``encode`` adds none; ``encode_pair`` appends it). ``max_len`` bounds
both: an input longer than that keeps its first ``max_len - 1`` tokens and its
EOS (T5 truncates inputs); a longer target is a ``DataError``, since a cut target
would teach the model to stop early.

A batch is one tensor (batch, 2, max_len): row 0 of each pair is the encoder's input,
right-padded with the tokenizer's [PAD]; row 1 its target, right-padded with -100
(ignored by the loss). One tensor, so the training loop moves and splits it as it
does corpus windows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from lnlm_ssm.utils.checks import check_positive_int

__all__ = ["DataError", "PairSampler", "encode_pair", "pair_batch", "read_pairs", "split_rows"]

IGNORE_INDEX = -100
FIELDS = ("input", "target")
# In a single file, every VAL_EVERY-th row (the 10th, 20th, ...) is held out for evaluation.
VAL_EVERY = 10


class DataError(ValueError):
    """A text-to-text data file or row that does not hold what it should."""


def read_pairs(path: Union[str, Path]) -> list[tuple[str, str, str]]:
    """The rows of the JSONL file ``path`` as (input, target, where), ``where`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text-to-text data must be a .jsonl file; {str(path)!r} is not a file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a row must be a JSON object with {list(FIELDS)}; got {type(row).__name__}")
            for field in FIELDS:
                value = row.get(field)
                if not isinstance(value, str) or not value:
                    got = "nothing" if field not in row else repr(value)
                    raise DataError(f"{where}: field {field!r} must be a non-empty string; got {got}")
            rows.append((row["input"], row["target"], where))
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def split_rows(rows: list, split: str) -> list:
    """The rows of ``split`` of one file: "val" every ``VAL_EVERY``-th, "train" the others."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    held_out = [i % VAL_EVERY == VAL_EVERY - 1 for i in range(len(rows))]
    chosen = [row for row, out in zip(rows, held_out) if out == (split == "val")]
    if not chosen:
        raise DataError(f"{split} split is empty: the file needs at least {VAL_EVERY} rows ({len(rows)} given)")
    return chosen


def encode_pair(tokenizer, source: str, target: str, max_len: int, where: str) -> tuple[list[int], list[int]]:
    """(input ids, target ids), each ending with EOS; see the module docstring for ``max_len``."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"text-to-text data needs a tokenizer with an eos token; {tokenizer!r} has none")
    source_ids = tokenizer.encode(source)[: max_len - 1] + [eos]
    target_ids = tokenizer.encode(target) + [eos]
    if len(target_ids) > max_len:
        raise DataError(
            f"{where}: field 'target' is {len(target_ids)} tokens with its EOS, longer than the {max_len} "
            "the decoder is given (seq_len): shorten it or raise --seq-len"
        )
    return source_ids, target_ids


def pair_batch(pairs: list[tuple[list[int], list[int]]], max_len: int, pad_token_id: int) -> torch.Tensor:
    """(len(pairs), 2, max_len): the layout of the module docstring."""
    out = torch.full((len(pairs), 2, max_len), IGNORE_INDEX, dtype=torch.long)
    out[:, 0] = pad_token_id
    for i, (source, target) in enumerate(pairs):
        out[i, 0, : len(source)] = torch.tensor(source)
        out[i, 1, : len(target)] = torch.tensor(target)
    return out


class PairSampler:
    """Batches of one split of a JSONL file's pairs (``split`` None: all of them), in an order reshuffled every
    epoch by a seeded RNG.

    As ``WindowSampler``: every rank draws the same global batch of ``batch_size`` rows and
    keeps its slice; ``state_dict`` resumes the order exactly. Every row is encoded (and
    checked) when the sampler is made.
    """

    def __init__(
        self, path, split: Optional[str], tokenizer, *, seq_len: int, batch_size: int, seed: int, rank: int = 0,
        world_size: int = 1,
    ) -> None:
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            check_positive_int(name, value)
        if tokenizer.pad_token_id is None:
            raise ValueError(f"text-to-text data needs a tokenizer with a [PAD] token; {tokenizer!r} has none")
        rows = read_pairs(path)
        if split is not None:
            rows = split_rows(rows, split)
        self.pairs = [encode_pair(tokenizer, s, t, seq_len, where) for s, t, where in rows]
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.local = batch_size // world_size
        self.rank = rank
        self.pad = tokenizer.pad_token_id
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs))

    def next_batch(self) -> torch.Tensor:
        chosen = []
        while len(chosen) < self.batch_size:
            order = self._order()
            take = order[self.position : self.position + self.batch_size - len(chosen)]
            chosen.extend(take.tolist())
            self.position += len(take)
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        mine = chosen[self.rank * self.local : (self.rank + 1) * self.local]
        return pair_batch([self.pairs[i] for i in mine], self.seq_len, self.pad)

    def eval_batches(self, n_batches: int) -> list[torch.Tensor]:
        """Up to ``n_batches`` batches of ``batch_size`` rows in file order (fewer when the split is smaller);
        every rank scores all of them (held-out sets are small)."""
        check_positive_int("n_batches", n_batches)
        stop = min(len(self.pairs), n_batches * self.batch_size)
        return [
            pair_batch(self.pairs[start : start + self.batch_size], self.seq_len, self.pad)
            for start in range(0, stop, self.batch_size)
        ]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
