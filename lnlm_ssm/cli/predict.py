"""``lnlm-ssm predict --model DIR --data in.jsonl --out out.jsonl``: a classifier's labels, one row per input row.

Input rows are those of training (``lnlm_ssm.data.finetune``) without their labels:
``{"text"}`` for a ``SequenceClassifier``; ``{"tokens"}`` or ``{"text"}`` for a
``TokenClassifier``. Output rows:

- single-label: ``{"label": name, "score": its probability}``;
- multi-label: ``{"label": [names whose probability > 0.5], "score": [every label's probability]}``;
- regression: ``{"label": null, "score": value}`` (a list with several outputs);
- tokens: ``{"labels": [one name per piece of "tokens", or per token of "text"], "scores": [...]}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lnlm_ssm.data.finetune import collate, read_rows
from lnlm_ssm.data.tokenizers import SpecialTokens, load_tokenizer
from lnlm_ssm.models import SequenceClassifier, TokenClassifier, from_pretrained
from lnlm_ssm.utils.checks import check_positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="label JSONL rows with a trained classifier",
        description="Write one JSON row per row of --data to --out: the label and score a SequenceClassifier "
        "gives each text, or the labels a TokenClassifier gives each piece / token.",
    )
    p.add_argument("--model", required=True, help="a SequenceClassifier or TokenClassifier checkpoint directory")
    p.add_argument("--data", required=True, help="a JSONL file of {\"text\"} (or {\"tokens\"}) rows")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward (default 16)")
    p.add_argument("--max-len", type=int, default=2048, help="tokens kept per row, the last ones (default 2048)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(handler=_predict)


def _predict(args) -> int:
    check_positive_int("--batch-size", args.batch_size)
    check_positive_int("--max-len", args.max_len)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = from_pretrained(args.model, device=device, dtype=torch.float32).eval()
    if not isinstance(model, (SequenceClassifier, TokenClassifier)):
        raise ValueError(f"--model must hold a SequenceClassifier or TokenClassifier; {args.model} holds a "
                         f"{model.architecture}")
    per_token = isinstance(model, TokenClassifier)
    tokenizer = load_tokenizer(args.model)
    rows = read_rows(args.data, "token" if per_token else "classify", labelled=False)
    # An encoder reads [CLS] text [SEP], as in training (data.finetune.Encoder's frame).
    frame = None
    if model.framed:
        special = SpecialTokens.of(tokenizer, ("cls", "sep"), needed_by=f"the encoder of {args.model}")
        frame = (special.cls, special.sep)
    room = args.max_len if frame is None else args.max_len - 2
    if room < 1:
        raise ValueError(f"--max-len must be >= 3 for an encoder ([CLS] text [SEP]); got {args.max_len}")
    examples = []
    for _, row in rows:
        pieces = row["tokens"] if "tokens" in row else None
        if pieces is None:
            ids = tokenizer.encode(row["text"])
            starts = list(range(len(ids)))
        else:
            ids, starts = [], []
            for piece in pieces:
                starts.append(len(ids))
                ids += tokenizer.encode(piece)
        if per_token:
            # A piece's label is its first token's: keep the row's start so the pieces stay whole.
            starts = [s for s in starts if s < room]
            ids = ids[:room]
        else:
            ids = ids[-room:]
        if frame is not None:
            ids, starts = [frame[0], *ids, frame[1]], [s + 1 for s in starts]
        examples.append(({"input_ids": ids, "labels": ids}, starts))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = model.config.id2label
    with out.open("w", encoding="utf-8") as f, torch.no_grad():
        for begin in range(0, len(examples), args.batch_size):
            chunk = examples[begin : begin + args.batch_size]
            batch = collate([e for e, _ in chunk], "token").to(device)
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            for i, (_, starts) in enumerate(chunk):
                f.write(json.dumps(_row(model, logits[i], starts, names)) + "\n")
    print(f"{len(examples)} rows labelled in {out}")
    return 0


def _row(model, logits: torch.Tensor, starts: list[int], names: dict[str, str]) -> dict:
    if isinstance(model, TokenClassifier):
        probs = logits[starts].softmax(dim=-1)
        score, index = probs.max(dim=-1)
        return {"labels": [names[str(i)] for i in index.tolist()], "scores": score.tolist()}
    problem = model.config.problem_type
    if problem == "regression" or (problem is None and model.config.num_labels == 1):
        value = logits.tolist()
        return {"label": None, "score": value[0] if len(value) == 1 else value}
    if problem == "multi_label_classification":
        probs = logits.sigmoid()
        return {"label": [names[str(i)] for i in range(len(probs)) if probs[i] > 0.5], "score": probs.tolist()}
    probs = logits.softmax(dim=-1)
    score, index = probs.max(dim=-1)
    return {"label": names[str(index.item())], "score": score.item()}

