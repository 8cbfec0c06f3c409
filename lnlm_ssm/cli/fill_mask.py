"""``lnlm-ssm fill-mask --model DIR --text "def [MASK](self):"``: a masked LM's top predictions for each [MASK]."""

from __future__ import annotations

import torch

from lnlm_ssm.data.tokenizers import SpecialTokens, load_tokenizer
from lnlm_ssm.models import MaskedLM, from_pretrained
from lnlm_ssm.utils.checks import check_positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "fill-mask",
        help="print a masked LM's top predictions for each [MASK] of a text",
        description="Run a masked LM (an encoder trained with --objective mlm or sop, or a BERT-family checkpoint) "
        "on --text, framed as [CLS] text [SEP] as in training, and print the --top-k tokens it predicts at each "
        "[MASK], most likely first, with their probabilities.",
    )
    p.add_argument("--model", required=True, help="a masked-LM checkpoint directory (ours or HF BERT-family)")
    p.add_argument("--text", required=True, help='the text, with one or more [MASK] markers: "def [MASK](self):"')
    p.add_argument("--top-k", type=int, default=5, help="predictions per [MASK] (default 5)")
    p.add_argument("--tokenizer", default=None, help="a directory or tokenizer.json (default: the --model directory)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.set_defaults(handler=_fill_mask)


def fill_mask(model: MaskedLM, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] of ``text`` in order, the ``top_k`` (token text, probability) pairs ``model`` predicts."""
    check_positive_int("top_k", top_k)
    tokens = SpecialTokens.of(tokenizer, ["mask", "cls", "sep"], needed_by="fill-mask")
    ids = [tokens.cls, *tokenizer.encode_with_special(text), tokens.sep]
    if tokens.mask not in ids:
        raise ValueError(f"--text must hold at least one [MASK] to fill; got {text!r}")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        logits = model(input_ids).logits[0, :, : tokens.vocab_size].float()
    # A special token (another [MASK], [PAD], ...) is never a filling.
    logits[:, list(tokens.special)] = float("-inf")
    probs = logits[input_ids[0] == tokens.mask].softmax(dim=-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [
        [(tokenizer.decode([i]), p) for i, p in zip(row_ids.tolist(), row_probs.tolist())]
        for row_ids, row_probs in zip(top.indices, top.values)
    ]


def _fill_mask(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = from_pretrained(args.model, device=device)
    if not isinstance(model, MaskedLM):
        raise ValueError(
            f"--model must hold a masked LM (MaskedLM, SentenceOrderMaskedLM); {args.model} holds a "
            f"{type(model).__name__}"
        )
    model.eval()
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    for i, predictions in enumerate(fill_mask(model, tokenizer, args.text, args.top_k)):
        print(f"[MASK] {i + 1}:")
        for text, p in predictions:
            print(f"  {p:7.2%}  {text!r}")
    return 0
