"""Fine-tuning data: JSONL rows, checked and tokenised, and the sampler that batches them.

One JSON object per line; the fields each format takes:

============  ==================================================================================
format        row
============  ==================================================================================
``classify``  ``{"text": str, "label": str | int}``
``token``     ``{"tokens": [str, ...], "labels": [label, ...]}``: the pieces, joined as they are,
              make the text; every model token of a piece carries the piece's label (with the
              byte tokenizer, every byte). Or ``{"text": str, "labels": [...]}``: one label per
              model token of the text.
``sft``       ``{"prompt": str, "completion": str}``: the loss is on the completion (and its eos)
``pairs``     ``{"prompt": str, "chosen": str, "rejected": str}``: reward models and DPO
============  ==================================================================================

Labels are names: an int label is the name ``str(label)``, mapped to an id through
``label2id`` (``label_ids`` builds it from a training file). A row with a missing
field, a value of the wrong type, an empty text or completion, or a label the
mapping lacks is a ``DataError`` naming the file, the line and the field; no row is
ever skipped. Rows longer than ``max_len`` tokens lose their oldest tokens (a text to
classify, a prompt); a completion is cut at its end only when it alone is too long,
and a row of tagged tokens keeps its first ``max_len``.

Encoders read a text framed as in their pre-training, ``[CLS] text [SEP]`` (``Encoder(frame=True)``;
the specials carry no token label), so that first-token pooling sees the [CLS] it was trained with.

Batches are right-padded (``attention_mask`` 1 real, 0 pad), except the prompts of
pairs, left-padded so that both completions continue each prompt's last token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from lnlm_ssm.data.tokenizers import SpecialTokens
from lnlm_ssm.utils.checks import check_choice, check_positive_int

__all__ = [
    "FORMATS", "DataError", "Encoder", "FinetuneBatch", "RowSampler", "collate", "label_ids", "pair_sequences",
    "read_rows",
]

IGNORE_INDEX = -100
FORMATS = ("classify", "token", "sft", "pairs")


class DataError(ValueError):
    """A fine-tuning data file or row that does not hold what its format needs."""


@dataclass
class FinetuneBatch:
    """Named tensors of one batch (all with the batch on dim 0); ``num_tokens``: its real tokens."""

    tensors: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def num_tokens(self) -> int:
        return int(sum(t.sum() for name, t in self.tensors.items() if name.endswith("mask")))

    def to(self, device) -> "FinetuneBatch":
        return FinetuneBatch({k: v.to(device) for k, v in self.tensors.items()})

    def chunk(self, n: int) -> list["FinetuneBatch"]:
        parts = {k: v.chunk(n) for k, v in self.tensors.items()}
        return [FinetuneBatch({k: v[i] for k, v in parts.items()}) for i in range(len(next(iter(parts.values()))))]


def _where(path: Path, line: int) -> str:
    return f"{path}, line {line}"


def _field(row: dict, name: str, kind: type, path: Path, line: int, *, nonempty: bool = True) -> Any:
    if name not in row:
        raise DataError(f"{_where(path, line)}: the row has no field {name!r} (fields: {sorted(row)})")
    value = row[name]
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise DataError(f"{_where(path, line)}: field {name!r} must be a {kind.__name__}; got {value!r}")
    if nonempty and len(value) == 0:
        raise DataError(f"{_where(path, line)}: field {name!r} must not be empty")
    return value


def _label_name(value: Any, name: str, path: Path, line: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{_where(path, line)}: field {name!r} must hold str or int labels; got {value!r}")
    return str(value)


def read_rows(path: Union[str, Path], fmt: str, *, labelled: bool = True) -> list[tuple[int, dict]]:
    """``(line number, row)`` of every row of the JSONL file ``path`` in format ``fmt``, each checked
    (without their labels when not ``labelled``: rows to predict)."""
    check_choice("format", fmt, FORMATS)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{_where(path, line_no)}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{_where(path, line_no)}: a row must be a JSON object; got {type(row).__name__}")
            _check_row(row, fmt, path, line_no, labelled)
            rows.append((line_no, row))
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def _check_row(row: dict, fmt: str, path: Path, line: int, labelled: bool) -> None:
    if fmt == "classify":
        _field(row, "text", str, path, line)
        if not labelled:
            return
        if "label" not in row:
            raise DataError(f"{_where(path, line)}: the row has no field 'label' (fields: {sorted(row)})")
        _label_name(row["label"], "label", path, line)
    elif fmt == "token":
        if "tokens" in row:
            pieces = _field(row, "tokens", list, path, line)
            if not all(isinstance(p, str) and p for p in pieces):
                raise DataError(f"{_where(path, line)}: field 'tokens' must be a list of non-empty strings")
        else:
            _field(row, "text", str, path, line)
        if not labelled:
            return
        labels = _field(row, "labels", list, path, line)
        for value in labels:
            _label_name(value, "labels", path, line)
        if "tokens" in row and len(labels) != len(row["tokens"]):
            raise DataError(
                f"{_where(path, line)}: field 'labels' must have one label per piece of 'tokens' "
                f"({len(row['tokens'])}); got {len(labels)}"
            )
    elif fmt == "sft":
        _field(row, "prompt", str, path, line, nonempty=False)
        _field(row, "completion", str, path, line)
    else:
        for name in ("prompt", "chosen", "rejected"):
            _field(row, name, str, path, line)


def label_ids(rows: list[tuple[int, dict]], fmt: str) -> dict[str, int]:
    """``label2id`` of the labels in training ``rows``: sorted, numerically when every name is an int."""
    key = "label" if fmt == "classify" else "labels"
    names = set()
    for _, row in rows:
        values = [row[key]] if fmt == "classify" else row[key]
        names.update(str(v) for v in values)
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return {name: i for i, name in enumerate(sorted(names, key=int if numeric else str))}


class Encoder:
    """Rows of one format -> token ids and targets, checked against ``label2id`` (formats with labels).

    ``frame``: each text becomes ``[CLS] text [SEP]`` within ``max_len`` (classify and token formats: an
    encoder's inputs); the tokenizer must have both specials.
    """

    def __init__(
        self, tokenizer, fmt: str, max_len: int, label2id: Optional[Mapping[str, int]] = None, *, frame: bool = False
    ) -> None:
        check_choice("format", fmt, FORMATS)
        check_positive_int("max_len", max_len)
        if fmt in ("classify", "token") and not label2id:
            raise ValueError(f"the {fmt!r} format needs label2id")
        self.tokenizer, self.fmt, self.max_len = tokenizer, fmt, max_len
        self.label2id = dict(label2id or {})
        self.frame = None
        if frame:
            if fmt not in ("classify", "token"):
                raise ValueError(f"frame applies to the classify and token formats (an encoder's); got {fmt!r}")
            if max_len < 3:
                raise ValueError(f"max_len must be >= 3 to hold [CLS] text [SEP]; got {max_len}")
            special = SpecialTokens.of(tokenizer, ("cls", "sep"), needed_by="an encoder's [CLS] text [SEP] inputs")
            self.frame = (special.cls, special.sep)

    def _label(self, value: Any, name: str, path: Path, line: int) -> int:
        label = str(value)
        if label not in self.label2id:
            raise DataError(
                f"{_where(path, line)}: field {name!r} holds the label {value!r}, which the model does not know "
                f"(its labels: {sorted(self.label2id)})"
            )
        return self.label2id[label]

    def encode(self, row: dict, path: Path, line: int) -> dict[str, list[int]]:
        tok = self.tokenizer
        room = self.max_len if self.frame is None else self.max_len - 2
        if self.fmt == "classify":
            ids = self._framed(tok.encode(row["text"])[-room:])
            return {"input_ids": ids, "label": [self._label(row["label"], "label", path, line)]}
        if self.fmt == "token":
            if "tokens" in row:
                ids, labels = [], []
                for piece, value in zip(row["tokens"], row["labels"]):
                    piece_ids = tok.encode(piece)
                    ids += piece_ids
                    labels += [self._label(value, "labels", path, line)] * len(piece_ids)
            else:
                ids = tok.encode(row["text"])
                if len(row["labels"]) != len(ids):
                    raise DataError(
                        f"{_where(path, line)}: field 'labels' must have one label per token of 'text' "
                        f"({len(ids)} tokens); got {len(row['labels'])}"
                    )
                labels = [self._label(v, "labels", path, line) for v in row["labels"]]
            return {"input_ids": self._framed(ids[:room]), "labels": self._framed(labels[:room], IGNORE_INDEX)}
        if self.fmt == "sft":
            prompt, completion = tok.encode(row["prompt"]), tok.encode(row["completion"], add_eos=True)
            completion = completion[: self.max_len]
            prompt = prompt[len(prompt) - min(len(prompt), self.max_len - len(completion)) :]
            return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}
        prompt = tok.encode(row["prompt"])
        chosen, rejected = tok.encode(row["chosen"], add_eos=True), tok.encode(row["rejected"], add_eos=True)
        longest = max(len(chosen), len(rejected))
        room = max(1, self.max_len - longest)
        prompt = prompt[-room:]
        cut = self.max_len - len(prompt)
        return {"prompt": prompt, "chosen": chosen[:cut], "rejected": rejected[:cut]}

    def _framed(self, seq: list[int], special: Optional[int] = None) -> list[int]:
        """``seq`` between [CLS] and [SEP] (or ``special`` twice: a label) when framing, else itself."""
        if self.frame is None:
            return seq
        first, last = self.frame if special is None else (special, special)
        return [first, *seq, last]


def _pad(seqs: list[list[int]], value: int, *, left: bool = False, min_len: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(min_len, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            span = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, span] = torch.tensor(s)
            mask[i, span] = 1
    return ids, mask


def collate(examples: list[dict[str, list[int]]], fmt: str) -> FinetuneBatch:
    """One batch of encoded examples (see the module docstring for the padding)."""
    if fmt == "pairs":
        prompt, prompt_mask = _pad([e["prompt"] for e in examples], 0, left=True)
        # Both completions share a width (and at least 2 columns: a 1-column continuation would take the
        # decode step, not the scan), so that the two can run as one batch from the shared prompt state.
        width = max(2, max(len(e[k]) for e in examples for k in ("chosen", "rejected")))
        chosen, chosen_mask = _pad([e["chosen"] for e in examples], 0, min_len=width)
        rejected, rejected_mask = _pad([e["rejected"] for e in examples], 0, min_len=width)
        return FinetuneBatch(dict(
            prompt_ids=prompt, prompt_mask=prompt_mask, chosen_ids=chosen, chosen_mask=chosen_mask,
            rejected_ids=rejected, rejected_mask=rejected_mask,
        ))
    input_ids, mask = _pad([e["input_ids"] for e in examples], 0)
    tensors = {"input_ids": input_ids, "attention_mask": mask}
    if fmt == "classify":
        tensors["labels"] = torch.tensor([e["label"][0] for e in examples], dtype=torch.long)
    else:
        tensors["labels"] = _pad([e["labels"] for e in examples], IGNORE_INDEX)[0]
    return FinetuneBatch(tensors)


class RowSampler:
    """Batches of the encoded rows of a JSONL file, in a seeded shuffled order, epoch after epoch.

    Each global batch of ``batch_size`` rows is drawn the same on every rank; rank ``r``
    keeps its slice, as ``WindowSampler`` does.
    """

    def __init__(
        self, path: Union[str, Path], encoder: Encoder, *, batch_size: int, seed: int, rank: int = 0,
        world_size: int = 1, rows: Optional[list[tuple[int, dict]]] = None,
    ) -> None:
        check_positive_int("batch_size", batch_size)
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by world_size ({world_size})")
        self.path = Path(path)
        self.encoder = encoder
        rows = read_rows(self.path, encoder.fmt) if rows is None else rows
        self.examples = [encoder.encode(row, self.path, line) for line, row in rows]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.local_batch_size = batch_size // world_size
        self.epoch = self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.examples))

    def next_batch(self) -> FinetuneBatch:
        """This rank's slice of the next ``batch_size`` rows (an epoch ends where its rows do; the batch that
        crosses it takes the next epoch's first rows)."""
        picked = []
        while len(picked) < self.batch_size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            take = min(self.batch_size - len(picked), len(self._order) - self.position)
            picked += self._order[self.position : self.position + take].tolist()
            self.position += take
        local = picked[self.rank * self.local_batch_size : (self.rank + 1) * self.local_batch_size]
        return collate([self.examples[i] for i in local], self.encoder.fmt)

    def eval_batches(self, n_batches: Optional[int] = None) -> list[FinetuneBatch]:
        """The rows in file order, once, in batches of ``batch_size`` (this rank's rows of each): the first
        ``n_batches`` batches, or all of them (None)."""
        if n_batches is not None:
            check_positive_int("n_batches", n_batches)
        batches = []
        stop = len(self.examples) if n_batches is None else min(len(self.examples), n_batches * self.batch_size)
        for start in range(0, stop, self.batch_size):
            rows = list(range(start, min(start + self.batch_size, len(self.examples))))[self.rank :: self.world_size]
            if rows:
                batches.append(collate([self.examples[i] for i in rows], self.encoder.fmt))
        return batches

    def state_dict(self) -> dict:
        return {"n_rows": len(self.examples), "batch_size": self.batch_size, "seed": self.seed,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("n_rows", len(self.examples)), ("batch_size", self.batch_size)):
            if state.get(key) != mine:
                raise ValueError(f"state was saved by a sampler with {key}={state.get(key)!r}; this one has {mine!r}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)


def pair_sequences(batch: FinetuneBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The full sequences of a pairs batch: ``[prompt; chosen]`` rows then ``[prompt; rejected]`` rows,
    ``(input_ids, attention_mask)`` of shape (2 * batch, prompt + completion width)."""
    prompt, prompt_mask = batch["prompt_ids"].repeat(2, 1), batch["prompt_mask"].repeat(2, 1)
    completions = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    completion_mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
    return torch.cat([prompt, completions], dim=1), torch.cat([prompt_mask, completion_mask], dim=1)
