"""Tokenizers: the byte-level ``ByteTokenizer`` and ``load_tokenizer`` for a checkpoint's tokenizer.json.

Both kinds share one small interface: ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``vocab_size`` and ``eos_token_id`` (None when unknown).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable, Optional, Union

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]


class ByteTokenizer:
    """Text as its UTF-8 bytes: ids 0..255 are the bytes, 256 is end-of-sequence; ``vocab_size`` 257."""

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ids + [self.eos_token_id] if add_eos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the byte ids; eos is skipped, and bytes that are not valid UTF-8 become U+FFFD."""
        data = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                continue
            if not 0 <= i < 256:
                raise ValueError(f"ids must be bytes 0..255 or eos {self.eos_token_id}; got {i}")
            data.append(i)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (the Hugging Face tokenizer.json format) with the interface above."""

    # Names of the end-of-sequence token in common tokenizer.json files (GPT-NeoX's, which
    # the incumbent's models use, first).
    _EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id: Optional[int] = next(
            (i for i in map(tokenizer.token_to_id, self._EOS_NAMES) if i is not None), None
        )

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids + [self.eos_token_id] if add_eos and self.eos_token_id is not None else ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: Union[str, Path]) -> Union[ByteTokenizer, HFTokenizer]:
    """The tokenizer of a checkpoint: ``path`` is its directory or a tokenizer.json file.

    A directory with tokenizer.json gives an ``HFTokenizer`` (needs the ``tokenizers``
    package); a directory without one gives the ``ByteTokenizer``, the tokenizer of
    models trained here.
    """
    path = Path(path)
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            return ByteTokenizer()
    elif path.is_file():
        file = path
    else:
        raise FileNotFoundError(
            f"path must be a checkpoint directory or a tokenizer.json file; {str(path)!r} is neither"
        )
    if importlib.util.find_spec("tokenizers") is None:
        raise ImportError(f"{file} needs the 'tokenizers' package to be read: pip install tokenizers")
    from tokenizers import Tokenizer

    return HFTokenizer(Tokenizer.from_file(str(file)))
