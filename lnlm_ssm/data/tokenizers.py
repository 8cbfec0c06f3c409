"""Tokenizers: byte-level text, amino acids (proteins), and Hugging Face tokenizer.json files.

All share one small interface: ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``vocab_size`` and ``eos_token_id`` (None when unknown);
the encoder specials ``pad_token_id``, ``mask_token_id``, ``cls_token_id`` and
``sep_token_id`` (None when the tokenizer has none), ``special_token_ids`` (every
id that is not text), and ``encode_with_special(text)``, which reads the literal
markers ``[PAD]``, ``[MASK]``, ``[CLS]`` and ``[SEP]`` in a text as those tokens.
``SpecialTokens.of`` gathers the specials an objective needs, with a clear error
when the tokenizer lacks one. ``load_tokenizer`` finds the one a checkpoint was
trained with.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from lnlm_ssm.utils.checks import check_choice
from lnlm_ssm.utils.files import atomic_write

__all__ = [
    "AminoAcidTokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "SpecialTokens",
    "load_tokenizer",
    "save_tokenizer_kind",
]

# Names the built-in tokenizer a checkpoint directory was trained with (tokenizer.json
# files name themselves).
TOKENIZER_KIND_FILE = "lnlm_tokenizer.json"

# The encoder specials, by role: the attribute ``<role>_token_id`` and the marker that
# ``encode_with_special`` reads in a text.
SPECIAL_ROLES = ("pad", "mask", "cls", "sep")
_MARKERS = {f"[{role.upper()}]": role for role in SPECIAL_ROLES}
_MARKER_PATTERN = re.compile("|".join(re.escape(m) for m in _MARKERS))


def _encode_with_markers(tokenizer, text: str, inline: Optional[dict[str, str]] = None) -> list[int]:
    """``tokenizer.encode`` of the text between the markers, with each marker's token id in its place.

    ``inline``: role -> the token's own text, for markers written into the text as that token and
    encoded with it (a tokenizer.json's added tokens) instead of splitting the text there.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str; got {type(text).__name__}")
    ids: list[int] = []
    pending = ""
    start = 0
    for match in _MARKER_PATTERN.finditer(text):
        role = _MARKERS[match.group()]
        token_id = _role_id(tokenizer, role, f"the marker {match.group()} in the text")
        pending += text[start : match.start()]
        if inline and role in inline:
            pending += inline[role]
        else:
            ids += tokenizer.encode(pending) + [token_id]
            pending = ""
        start = match.end()
    return ids + tokenizer.encode(pending + text[start:])


def _role_id(tokenizer, role: str, needed_by: str) -> int:
    token_id = getattr(tokenizer, f"{role}_token_id")
    if token_id is None:
        raise ValueError(
            f"the tokenizer {tokenizer!r} has no [{role.upper()}] token ({role}_token_id is None), which "
            f"{needed_by} needs: use a tokenizer that defines one"
        )
    return token_id


@dataclass(frozen=True)
class SpecialTokens:
    """The ids an encoder objective or collator uses, taken from a tokenizer once.

    ``pad``, ``mask``, ``cls``, ``sep``: the role ids (None where the tokenizer has none, which
    ``of`` allows only for roles not asked for); ``special``: every id that is not text (never masked, never a random
    replacement); ``vocab_size``: the tokenizer's.
    """

    vocab_size: int
    special: tuple[int, ...]
    pad: Optional[int] = None
    mask: Optional[int] = None
    cls: Optional[int] = None
    sep: Optional[int] = None

    @classmethod
    def of(cls, tokenizer, roles: Iterable[str], needed_by: str) -> "SpecialTokens":
        """The specials of ``tokenizer``; each of ``roles`` must exist, else a ValueError naming the
        tokenizer, the missing token and ``needed_by`` (what needs it, e.g. "the mlm objective")."""
        roles = tuple(roles)
        for role in roles:
            check_choice("roles", role, SPECIAL_ROLES)
            _role_id(tokenizer, role, needed_by)
        return cls(
            vocab_size=int(tokenizer.vocab_size),
            special=tuple(sorted(tokenizer.special_token_ids)),
            **{role: getattr(tokenizer, f"{role}_token_id") for role in SPECIAL_ROLES},
        )


class ByteTokenizer:
    """Text as its UTF-8 bytes: ids 0..255 are the bytes, 256 is end-of-sequence, then the encoder
    specials [PAD] 257, [MASK] 258, [CLS] 259, [SEP] 260; ``vocab_size`` 261.

    The specials come after eos, so a model trained when the vocabulary was the 256 bytes and eos
    (``text_vocab_size``, 257) reads text the same way.
    """

    text_vocab_size = 257
    eos_token_id = 256
    pad_token_id = 257
    mask_token_id = 258
    cls_token_id = 259
    sep_token_id = 260
    vocab_size = 261
    special_token_ids = frozenset(range(256, 261))

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ids + [self.eos_token_id] if add_eos else ids

    def encode_with_special(self, text: str) -> list[int]:
        """``encode``, with the markers [PAD], [MASK], [CLS] and [SEP] in ``text`` as their ids."""
        return _encode_with_markers(self, text)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of the byte ids; eos and the specials are skipped, and bytes that are not valid UTF-8
        become U+FFFD."""
        data = bytearray()
        for i in ids:
            i = int(i)
            if i in self.special_token_ids:
                continue
            if not 0 <= i < 256:
                raise ValueError(f"ids must be bytes 0..255 or specials 256..{self.vocab_size - 1}; got {i}")
            data.append(i)
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


_AMINO_LETTERS = "ACDEFGHIKLMNPQRSTVWY" + "XBZUO"


def _amino_lookup() -> np.ndarray:
    """ASCII code -> AminoAcidTokenizer id: letters of either case to 3.., everything else unk (2)."""
    lookup = np.full(128, 2, dtype=np.int64)
    for i, letter in enumerate(_AMINO_LETTERS, start=3):
        lookup[ord(letter)] = lookup[ord(letter.lower())] = i
    return lookup


class AminoAcidTokenizer:
    """Protein sequences, one token per residue: pad 0, eos 1, unk 2, then the 20 standard amino
    acids and the IUPAC extras X B Z U O (ids 3..27), then the encoder specials [MASK] 28,
    [CLS] 29, [SEP] 30; ``vocab_size`` 31. [PAD] is the pad 0 it always had. A model trained
    before the encoder specials has the first ``text_vocab_size`` (28) ids.

    Letters are case-insensitive (FASTA files mark regions in lower case); any other character
    is unk, which decodes to ``?``.
    """

    LETTERS = _AMINO_LETTERS
    pad_token_id = 0
    eos_token_id = 1
    unk_token_id = 2
    text_vocab_size = 3 + len(LETTERS)
    mask_token_id = text_vocab_size
    cls_token_id = mask_token_id + 1
    sep_token_id = mask_token_id + 2
    vocab_size = mask_token_id + 3
    special_token_ids = frozenset({0, 1, 2, mask_token_id, cls_token_id, sep_token_id})

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        ids = self.encode_array(text).tolist()
        return ids + [self.eos_token_id] if add_eos else ids

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` as an int64 array, without a Python int per residue (the corpus path)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per character
        return np.where(codes < 128, _AMINO_LOOKUP[codes & 127], self.unk_token_id)

    def encode_with_special(self, text: str) -> list[int]:
        """``encode``, with the markers [PAD], [MASK], [CLS] and [SEP] in ``text`` as their ids."""
        return _encode_with_markers(self, text)

    def decode(self, ids: Iterable[int]) -> str:
        """The residues of ``ids``; unk is ``?``, the other specials (pad, eos, mask, cls, sep) are skipped."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids must be in [0, {self.vocab_size}); got {i}")
            if i == self.unk_token_id:
                out.append("?")
            elif i not in self.special_token_ids:
                out.append(self.LETTERS[i - 3])
        return "".join(out)

    def __repr__(self) -> str:
        return "AminoAcidTokenizer()"


_AMINO_LOOKUP = _amino_lookup()


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (the Hugging Face tokenizer.json format) with the interface above.

    The encoder specials are the file's own: [CLS] and [SEP] from its post-processor (BERT's and
    RoBERTa's, or a template such as ESM's ``<cls> $A <eos>``), [PAD] from its padding settings,
    and otherwise the token of a conventional name (``[MASK]``/``<mask>``, ``[PAD]``/``<pad>``,
    ``[CLS]``/``<s>``/``<cls>``, ``[SEP]``/``</s>``/``<sep>``); None when it has none.
    ``special_tokens`` maps each role to its token's text. ``name`` (the file, when loaded from
    one) identifies it in errors.
    """

    # Names of the end-of-sequence token in common tokenizer.json files (GPT-NeoX's, which
    # the incumbent's models use, first).
    _EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
    _ROLE_NAMES = {
        "pad": ("[PAD]", "<pad>"),
        "mask": ("[MASK]", "<mask>"),
        "cls": ("[CLS]", "<s>", "<cls>"),
        "sep": ("[SEP]", "</s>", "<sep>"),
    }

    def __init__(self, tokenizer, name: str = "tokenizers.Tokenizer") -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id: Optional[int] = next(
            (i for i in map(tokenizer.token_to_id, self._EOS_NAMES) if i is not None), None
        )
        spec = json.loads(tokenizer.to_str())
        declared = {**_post_processor_roles(spec.get("post_processor")), **_padding_roles(spec.get("padding"))}
        # role -> the token's text, in SPECIAL_ROLES order.
        self.special_tokens: dict[str, Optional[str]] = {
            role: declared.get(role) or next((n for n in names if tokenizer.token_to_id(n) is not None), None)
            for role, names in self._ROLE_NAMES.items()
        }
        ids = [None if t is None else tokenizer.token_to_id(t) for t in self.special_tokens.values()]
        self.pad_token_id, self.mask_token_id, self.cls_token_id, self.sep_token_id = ids
        added = spec.get("added_tokens") or []
        # Added tokens are matched in raw text before the model splits it: a marker becomes one of these.
        self._added = {t["content"] for t in added}
        self.special_token_ids = frozenset(
            [t["id"] for t in added if t.get("special")] + [i for i in ids + [self.eos_token_id] if i is not None]
        )

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids + [self.eos_token_id] if add_eos and self.eos_token_id is not None else ids

    def encode_with_special(self, text: str) -> list[int]:
        """``encode``, with the markers [PAD], [MASK], [CLS] and [SEP] in ``text`` as this tokenizer's tokens.

        A marker whose token is an added token is written as that token and the whole text is encoded
        at once, so the file's own rules apply around it (RoBERTa's ``<mask>`` takes the space before
        it); any other marker splits the text.
        """
        inline = {role: token for role, token in self.special_tokens.items() if token in self._added}
        return _encode_with_markers(self, text, inline)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r})"


def _post_processor_roles(processor) -> dict[str, str]:
    """The [CLS] and [SEP] tokens a tokenizer.json post-processor adds around one sequence."""
    if not isinstance(processor, dict):
        return {}
    kind = processor.get("type")
    if kind == "Sequence":
        roles: dict[str, str] = {}
        for inner in processor.get("processors") or []:
            roles.update(_post_processor_roles(inner))
        return roles
    if kind in ("BertProcessing", "RobertaProcessing"):
        return {role: processor[role][0] for role in ("cls", "sep") if processor.get(role)}
    if kind == "TemplateProcessing":
        pieces = processor.get("single") or []
        at = next((i for i, p in enumerate(pieces) if "Sequence" in p), None)
        if at is None:
            return {}
        before = [p["SpecialToken"]["id"] for p in pieces[:at] if "SpecialToken" in p]
        after = [p["SpecialToken"]["id"] for p in pieces[at + 1 :] if "SpecialToken" in p]
        return {**({"cls": before[-1]} if before else {}), **({"sep": after[0]} if after else {})}
    return {}


def _padding_roles(padding) -> dict[str, str]:
    return {"pad": padding["pad_token"]} if isinstance(padding, dict) and padding.get("pad_token") else {}


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

    return HFTokenizer(Tokenizer.from_file(str(file)), name=str(file))
