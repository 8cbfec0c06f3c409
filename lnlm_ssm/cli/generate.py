"""``lnlm-ssm generate --model PATH_OR_PRESET --prompt TEXT ...``: continue a prompt, streaming to stdout.

A ``Seq2SeqLM`` checkpoint (T5) reads the prompt, with EOS appended as T5's inputs
end, as its encoder's input, and the decoded output is printed once it is complete;
its sentinel ids (span corruption's, above the tokenizer's vocabulary) print as
T5's ``<extra_id_N>``.
"""

from __future__ import annotations

import sys

import torch

from lnlm_ssm.data.tokenizers import ByteTokenizer, load_tokenizer
from lnlm_ssm.layers.quantized import QUANTIZATION_MODES, quantize_
from lnlm_ssm.models.causal_lm import MambaLM
from lnlm_ssm.models.config import PRESETS
from lnlm_ssm.models.registry import from_pretrained
from lnlm_ssm.models.seq2seq import Seq2SeqLM

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt, streaming the text to stdout",
        description="Continue --prompt with a checkpoint or a randomly initialised preset; the new text "
        "(not the prompt) is written to stdout as it is generated.",
    )
    p.add_argument(
        "--model",
        required=True,
        help=f"a checkpoint directory / Hub repo id, or a preset name ({', '.join(sorted(PRESETS))}): "
        "a preset builds a randomly initialised model with the byte tokenizer",
    )
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="at most this many new tokens (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random init (presets) and of sampling")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="parameter dtype (default float32)")
    p.add_argument(
        "--quantize",
        choices=QUANTIZATION_MODES,
        default=None,
        help="quantise the weights before generating (weight-only: int8 with per-channel scales, or bf16; "
        "activations and math stay float32): faster decoding on CPU, which reads every weight once per token",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a directory or tokenizer.json to read the tokenizer from (default: the --model directory)",
    )
    p.set_defaults(handler=_generate)


def _load(args, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from --model: a preset or a checkpoint."""
    if args.model in PRESETS:
        tokenizer = ByteTokenizer()
        print(
            f"lnlm-ssm: {args.model!r} is a preset: building a randomly initialised model with the byte "
            f"tokenizer (vocab_size {tokenizer.vocab_size}); its output is noise",
            file=sys.stderr,
        )
        model = MambaLM.from_name(args.model, vocab_size=tokenizer.vocab_size, device=device, dtype=dtype)
        return model, tokenizer
    model = from_pretrained(args.model, device=device, dtype=dtype)
    if not isinstance(model, (MambaLM, Seq2SeqLM)):
        raise ValueError(
            f"--model {args.model} holds a {type(model).__name__}; generate takes a MambaLM or a Seq2SeqLM checkpoint"
        )
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    vocab_size = model.config.vocab_size
    if isinstance(model, Seq2SeqLM):
        if tokenizer.eos_token_id is None or tokenizer.vocab_size > vocab_size:
            raise ValueError(
                f"a Seq2SeqLM needs a tokenizer with an eos token and at most its vocab_size {vocab_size} tokens; "
                f"got {tokenizer!r} ({tokenizer.vocab_size} tokens): give the one it was trained with by --tokenizer"
            )
        return model, tokenizer
    # Generation needs the text ids and eos: a model trained before the built-in tokenizers gained their
    # encoder specials ([PAD], [MASK], [CLS], [SEP]) lacks only those, and generates as before.
    if isinstance(tokenizer, ByteTokenizer):
        if vocab_size not in (tokenizer.text_vocab_size, tokenizer.vocab_size):
            raise ValueError(
                f"{args.model} has no tokenizer.json and its vocab_size {vocab_size} is not the byte tokenizer's "
                f"({tokenizer.text_vocab_size} or {tokenizer.vocab_size}): give the tokenizer it was trained with "
                "by --tokenizer"
            )
    elif getattr(tokenizer, "text_vocab_size", tokenizer.vocab_size) > model.config.padded_vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}")
    return model, tokenizer


def _generate(args) -> int:
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0; got {args.max_new_tokens}")
    if args.quantize is not None and args.dtype != "float32":
        raise ValueError(
            f"--quantize {args.quantize} quantises a float32 model (its math stays float32); got --dtype {args.dtype}"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, tokenizer = _load(args, device, _DTYPES[args.dtype])
    if args.quantize is not None:
        quantize_(model, args.quantize)
    model.eval()
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("--prompt must not be empty: generation continues at least one token")
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    if isinstance(model, Seq2SeqLM):
        return _generate_seq2seq(args, model, tokenizer, prompt_ids, generator)

    new_ids: list[int] = []
    written = 0

    def stream(token: torch.Tensor) -> None:
        nonlocal written
        new_ids.append(int(token[0]))
        text = tokenizer.decode(new_ids)
        # A character split over several tokens (bytes) decodes as U+FFFD until it is whole.
        complete = len(text.rstrip("\ufffd"))
        if complete > written:
            sys.stdout.write(text[written:complete])
            sys.stdout.flush()
            written = complete

    model.generate(
        torch.tensor([prompt_ids], dtype=torch.long, device=device),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        eos_token_id=tokenizer.eos_token_id,
        streamer=stream,
        generator=generator,
    )
    sys.stdout.write(tokenizer.decode(new_ids)[written:] + "\n")
    sys.stdout.flush()
    return 0


def _generate_seq2seq(args, model: Seq2SeqLM, tokenizer, prompt_ids: list[int], generator) -> int:
    """Print the decoder's output for the encoder input ``prompt_ids`` (the module docstring)."""
    if args.repetition_penalty != 1.0:
        raise ValueError(f"--repetition-penalty is not supported by a Seq2SeqLM; got {args.repetition_penalty}")
    eos = tokenizer.eos_token_id
    source = torch.tensor([prompt_ids + [eos]], dtype=torch.long, device=next(model.parameters()).device)
    out = model.generate(
        source, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_token_id=eos, generator=generator,
    )
    ids = out[0, 1:].tolist()  # after the decoder start token
    if eos in ids:
        ids = ids[: ids.index(eos)]
    top = model.config.vocab_size - 1
    pieces, run = [], []
    for i in ids:
        if i >= tokenizer.vocab_size:
            pieces += [tokenizer.decode(run), f"<extra_id_{top - i}>"]
            run = []
        else:
            run.append(i)
    sys.stdout.write("".join(pieces) + tokenizer.decode(run) + "\n")
    sys.stdout.flush()
    return 0
