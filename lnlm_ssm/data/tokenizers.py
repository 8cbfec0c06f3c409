"""Tokenizers: byte-level text, amino acids (proteins), and Hugging Face tokenizer.json files.

All share one small interface: ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``vocab_size`` and ``eos_token_id`` (None when unknown).
``load_tokenizer`` finds the one a checkpoint was trained with.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from lnlm_ssm.utils.checks import check_choice
from lnlm_ssm.utils.files import atomic_write

__all__ = ["AminoAcidTokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "save_tokenizer_kind"]

# Names the built-in tokenizer a checkpoint directory was trained with (tokenizer.json
# files name themselves).
TOKENIZER_KIND_FILE = "lnlm_tokenizer.json"


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


_AMINO_LETTERS = "ACDEFGHIKLMNPQRSTVWY" + "XBZUO"


def _amino_lookup() -> np.ndarray:
    """ASCII code -> AminoAcidTokenizer id: letters of either case to 3.., everything else unk (2)."""
    lookup = np.full(128, 2, dtype=np.int64)
    for i, letter in enumerate(_AMINO_LETTERS, start=3):
        lookup[ord(letter)] = lookup[ord(letter.lower())] = i
    return lookup


class AminoAcidTokenizer:
    """Protein sequences, one token per residue: pad 0, eos 1, unk 2, then the 20 standard amino
    acids and the IUPAC extras X B Z U O (ids 3..27); ``vocab_size`` 28.

    Letters are case-insensitive (FASTA files mark regions in lower case); any other character
    is unk, which decodes to ``?``.
    """

    LETTERS = _AMINO_LETTERS
    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = 2
    vocab_size = 3 + len(LETTERS)

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        ids = self.encode_array(text).tolist()
        return ids + [self.eos_token_id] if add_eos else ids

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int64 array, without a Python int per residue (the corpus path)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per character
        return np.where(codes < 128, _AMINO_LOOKUP[codes & 127], self.unk_token_id)

    def decode(self, ids: Iterable[int]) -> str:
        """The residues of ``ids``; pad and eos are skipped, unk is ``?``."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids must be in [0, {self.vocab_size}); got {i}")
            if i >= 3:
                out.append(self.LETTERS[i - 3])
            elif i == self.unk_token_id:
                out.append("?")
        return "".join(out)


_AMINO_LOOKUP = _amino_lookup()


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


BUILTIN_TOKENIZERS = {"byte": ByteTokenizer, "amino": AminoAcidTokenizer}


def save_tokenizer_kind(directory: Union[str, Path], kind: str) -> None:
    """Record in a checkpoint directory that it was trained with the built-in tokenizer ``kind``."""
    check_choice("kind", kind, sorted(BUILTIN_TOKENIZERS))
    atomic_write(Path(directory) / TOKENIZER_KIND_FILE, json.dumps({"kind": kind}) + "\n")


def load_tokenizer(path: Union[str, Path]) -> Union[ByteTokenizer, AminoAcidTokenizer, "HFTokenizer"]:
    """The tokenizer of a checkpoint: ``path`` is its directory or a tokenizer.json file.

    A directory gives, in this order: the built-in tokenizer its lnlm_tokenizer.json
    names; an ``HFTokenizer`` for its tokenizer.json (needs the ``tokenizers``
    package); else the ``ByteTokenizer``, the default of models trained here.
    """
    path = Path(path)
    if path.is_dir():
        kind_file = path / TOKENIZER_KIND_FILE
        if kind_file.is_file():
            try:
                kind = json.loads(kind_file.read_text())["kind"]
                return BUILTIN_TOKENIZERS[kind]()
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{kind_file} must hold {{\"kind\": one of {sorted(BUILTIN_TOKENIZERS)}}}; it could not be read ({exc!r})"
                ) from None
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
