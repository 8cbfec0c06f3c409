"""Corpora: a source tokenized once to a flat token file, read back memory-mapped.

``prepare_corpus(source, out_dir)`` walks text files (or FASTA files), tokenizes every
document once, joins the documents with end-of-sequence tokens and writes

- ``out_dir/tokens.bin``: all tokens, one flat array (uint16 when the vocabulary fits, else uint32);
- ``out_dir/manifest.json``: what the tokens are (tokenizer, dtype, train/val ranges, text bytes
  per split for bits-per-byte) and fingerprints of the source listing and of the options, so a
  second call with the same inputs reuses the files and a changed source or option rebuilds them.

``Corpus`` reads a prepared directory (memory-mapped, nothing loaded up front);
``data.sampler.WindowSampler`` draws windows of it.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from lnlm_ssm.data.tokenizers import AminoAcidTokenizer, ByteTokenizer, HFTokenizer, load_tokenizer
from lnlm_ssm.utils.checks import check_positive_int
from lnlm_ssm.utils.files import atomic_path, atomic_write

__all__ = ["Corpus", "default_corpus_dir", "prepare_corpus"]

FORMAT_VERSION = 1
TOKENS_NAME = "tokens.bin"
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")

TEXT_EXTENSIONS = frozenset(
    ".txt .md .rst .tex .py .pyi .pyx .c .h .cc .cpp .hpp .cu .cuh .java .js .ts .go .rs .rb .sh "
    ".toml .yaml .yml .json .cfg .ini .html .css .xml .csv".split()
)
FASTA_EXTENSIONS = frozenset(".fa .fasta .faa .fa.gz .fasta.gz .faa.gz".split())
# Never corpus text: caches, installed third-party packages (the stdlib's directory holds
# site-packages) and dependency trees.
_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})
# Tokens are buffered and written in blocks of about this many: one write per document is
# slow for corpora of millions of short protein records.
_WRITE_BLOCK = 1 << 20


def default_corpus_dir() -> Path:
    """The Python standard library's source directory: real text shipped with every Python, no download."""
    return Path(sysconfig.get_paths()["stdlib"])


# ---------------------------------------------------------------------------------------------
# prepare_corpus


def prepare_corpus(
    source: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    *,
    tokenizer="byte",
    kind: str = "auto",
    val_fraction: float = 0.05,
    max_bytes: Optional[int] = None,
    extensions: Optional[Iterable[str]] = None,
) -> "Corpus":
    """Tokenize ``source`` (a directory or one file) into ``out_dir``, or reuse it if already done.

    - ``tokenizer``: ``"byte"`` (``ByteTokenizer``), ``"amino"`` (``AminoAcidTokenizer``), the path
      of a tokenizer.json (or of a directory holding one), or an object with ``encode``,
      ``vocab_size`` and ``eos_token_id``.
    - ``kind``: ``"text"`` (each file is a document), ``"fasta"`` (each record is a document:
      headers and ``;`` comments skipped, sequence lines joined) or ``"auto"``: FASTA for the amino
      tokenizer, for a FASTA file, for ``extensions`` that are all FASTA ones, and for a directory
      with FASTA files and no text files; text otherwise.
    - ``extensions``: the file name endings read from a directory (default: common text and code
      extensions, or .fa/.fasta/.faa and their .gz for FASTA). Hidden files and directories,
      ``__pycache__``, ``site-packages``, ``dist-packages`` and ``node_modules`` are not walked.
      Text files that cannot be read or are not UTF-8 (binary) are skipped and counted.
    - ``val_fraction``: the validation split is the shortest tail of whole documents holding at
      least this fraction of the tokens (0: no validation split). A corpus of a single document
      is cut in two at a line boundary first, so that one file still gives both splits.
    - ``max_bytes``: read at most this many bytes of text (quick demos); the last document is cut.

    Files are read in sorted path order; every document ends with the tokenizer's eos. The
    manifest is written last, after the token file is complete, and removed first when a
    rebuild starts: a manifest always describes a whole token file. Prepare on one process and
    ``Corpus.open`` on the others.
    """
    source = Path(source).resolve()
    out_dir = Path(out_dir).resolve()
    if not source.exists():
        raise FileNotFoundError(f"source must be a directory or a file; {str(source)!r} does not exist")
    if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
        raise ValueError(f"val_fraction must be a number in [0, 1); got {val_fraction!r}")
    if max_bytes is not None:
        check_positive_int("max_bytes", max_bytes)
    if kind not in ("auto", "text", "fasta"):
        raise ValueError(f"kind must be 'auto', 'text' or 'fasta'; got {kind!r}")
    tok, tok_info, tok_identity = _resolve_tokenizer(tokenizer)
    if tok.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id: documents are joined with eos, so one is needed")
    if not 0 <= tok.eos_token_id < tok.vocab_size:
        raise ValueError(f"tokenizer's eos_token_id {tok.eos_token_id} is outside [0, vocab_size={tok.vocab_size})")
    exts = _normalize_extensions(extensions)

    all_files = [source] if source.is_file() else _walk(source, exclude=out_dir)
    kind = _resolve_kind(kind, source, tok_info["kind"], exts, all_files)
    if tok_info["kind"] == "amino" and kind != "fasta":
        raise ValueError("tokenizer='amino' reads protein FASTA files: kind must be 'fasta' or 'auto'")
    if exts is None:
        exts = FASTA_EXTENSIONS if kind == "fasta" else TEXT_EXTENSIONS
    files = all_files if source.is_file() else [f for f in all_files if _has_extension(f, exts)]
    if not files:
        raise ValueError(f"no files ending in {sorted(exts)} under {source} (kind={kind!r})")

    options = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok_identity,
        "kind": kind,
        "val_fraction": float(val_fraction),
        "max_bytes": max_bytes,
        "extensions": sorted(exts),
    }
    root = source.parent if source.is_file() else source
    listing = [[f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns] for f, st in _stat_all(files)]
    source_fp = _fingerprint({"source": str(source), "files": listing})
    options_fp = _fingerprint(options)

    fingerprints = {"source_fingerprint": source_fp, "options_fingerprint": options_fp}
    try:
        existing = Corpus.open(out_dir)
    except (OSError, ValueError):
        existing = None  # nothing there yet, or a damaged one: rebuild
    if existing is not None and all(existing.manifest.get(k) == v for k, v in fingerprints.items()):
        return existing

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    counts = {"files": 0, "skipped": 0}
    read = _fasta_documents if kind == "fasta" else _text_documents
    documents = _split_if_single(read(files, max_bytes, counts), val_fraction)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    with atomic_path(out_dir / TOKENS_NAME) as tmp:
        with open(tmp, "wb") as f:
            doc_tokens, doc_bytes = _write_tokens(documents, tok, dtype, f)
        if not doc_tokens:
            raise ValueError(
                f"no text in {source}: {counts['files']} file(s) read, {counts['skipped']} skipped as unreadable "
                "or binary"
            )
        n_train_docs = _train_document_count(doc_tokens, val_fraction)

    n_tokens = int(sum(doc_tokens))
    split_at = int(sum(doc_tokens[:n_train_docs]))
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": str(source),
        "kind": kind,
        "tokenizer": {**tok_info, "vocab_size": int(tok.vocab_size), "eos_token_id": int(tok.eos_token_id)},
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "splits": {
            "train": {
                "start": 0,
                "stop": split_at,
                "n_bytes": int(sum(doc_bytes[:n_train_docs])),
                "n_documents": n_train_docs,
            },
            "val": {
                "start": split_at,
                "stop": n_tokens,
                "n_bytes": int(sum(doc_bytes[n_train_docs:])),
                "n_documents": len(doc_tokens) - n_train_docs,
            },
        },
        "n_files": counts["files"],
        "n_skipped_files": counts["skipped"],
        **fingerprints,
        "options": options,
    }
    atomic_write(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
    return Corpus.open(out_dir)


def _resolve_tokenizer(tokenizer):
    """(tokenizer object, manifest info, identity for the options fingerprint)."""
    if isinstance(tokenizer, str) and tokenizer in ("byte", "amino"):
        tokenizer = ByteTokenizer() if tokenizer == "byte" else AminoAcidTokenizer()
    if type(tokenizer) is ByteTokenizer:
        return tokenizer, {"kind": "byte", "name": "ByteTokenizer"}, "byte"
    if type(tokenizer) is AminoAcidTokenizer:
        return tokenizer, {"kind": "amino", "name": "AminoAcidTokenizer"}, "amino"
    path = None
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer).resolve()
        if not (path.is_file() or (path / "tokenizer.json").is_file()):
            raise ValueError(
                f"tokenizer must be 'byte', 'amino', a tokenizer.json (or a directory with one) or a tokenizer "
                f"object; {str(tokenizer)!r} is none of these"
            )
        tokenizer = load_tokenizer(path)
    if isinstance(tokenizer, HFTokenizer):
        content = hashlib.sha256(tokenizer.tokenizer.to_str().encode()).hexdigest()
        info = {"kind": "hf", "name": str(path) if path else "tokenizers.Tokenizer"}
        if path:
            info["path"] = str(path)
        return tokenizer, info, {"hf": content}
    missing = [a for a in ("encode", "vocab_size", "eos_token_id") if not hasattr(tokenizer, a)]
    if missing:
        raise TypeError(
            f"tokenizer must be 'byte', 'amino', a tokenizer.json path or an object with encode, vocab_size and "
            f"eos_token_id; {type(tokenizer).__name__} lacks {', '.join(missing)}"
        )
    name = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    identity = {"custom": name, "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_token_id}
    return tokenizer, {"kind": "custom", "name": name}, identity


def _normalize_extensions(extensions) -> Optional[frozenset]:
    if extensions is None:
        return None
    if isinstance(extensions, str):
        raise TypeError(
            f"extensions must be a collection of strings such as ['.py', '.md']; got the str {extensions!r}"
        )
    exts = frozenset("." + e.lower().lstrip(".") for e in extensions)
    if not exts or "." in exts:
        raise ValueError(f"extensions must be non-empty file name endings such as ['.py', '.md']; got {extensions!r}")
    return exts


def _has_extension(path: Path, exts: frozenset) -> bool:
    name = path.name.lower()
    return any(name.endswith(e) for e in exts)


def _resolve_kind(kind: str, source: Path, tokenizer_kind: str, exts, files: list) -> str:
    if kind != "auto":
        return kind
    if tokenizer_kind == "amino":
        return "fasta"
    if source.is_file():
        return "fasta" if _has_extension(source, FASTA_EXTENSIONS) else "text"
    if exts is not None:
        return "fasta" if exts <= FASTA_EXTENSIONS else "text"
    has_fasta = any(_has_extension(f, FASTA_EXTENSIONS) for f in files)
    has_text = any(_has_extension(f, TEXT_EXTENSIONS) for f in files)
    return "fasta" if has_fasta and not has_text else "text"


def _walk(root: Path, exclude: Path) -> list[Path]:
    """Every non-hidden file under ``root``, sorted; ``exclude`` (the output directory) is not entered."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d
            for d in dirnames
            if not d.startswith(".") and d not in _SKIP_DIRS and os.path.join(dirpath, d) != str(exclude)
        ]
        files.extend(Path(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(files)


def _stat_all(files: list) -> Iterator:
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue  # vanished or a dangling link; reading will skip it as well
        yield f, st


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _text_documents(files: list, max_bytes: Optional[int], counts: dict) -> Iterator[str]:
    budget = max_bytes
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read() if budget is None else f.read(budget + 1)
        except OSError:
            counts["skipped"] += 1
            continue
        cut = budget is not None and len(data) > budget
        if cut:
            data = data[:budget]
        try:
            if b"\0" in data:
                raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
            # Not final when cut: a character split by the cut is dropped, not an error.
            text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not cut)
        except UnicodeDecodeError:
            counts["skipped"] += 1
            continue
        counts["files"] += 1
        if text:
            yield text
        if budget is not None:
            budget -= len(data)
            if budget <= 0:
                return


def _fasta_documents(files: list, max_bytes: Optional[int], counts: dict) -> Iterator[str]:
    budget = max_bytes
    for path in files:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        try:
            f = opener(path, "rt", encoding="utf-8")
        except OSError:
            counts["skipped"] += 1
            continue
        counts["files"] += 1
        with f:
            try:
                for seq in _fasta_records(f, path):
                    if budget is not None:
                        seq = seq[:budget]
                        budget -= len(seq)
                    yield seq
                    if budget is not None and budget <= 0:
                        return
            except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
                raise ValueError(f"{path} is not a readable FASTA file: {e}") from e


def _fasta_records(lines: Iterable[str], path: Path) -> Iterator[str]:
    """The sequences of a FASTA file: '>' starts a record, ';' lines are comments, whitespace is dropped."""
    chunks: Optional[list] = None  # None until the first header
    for lineno, line in enumerate(lines, start=1):
        if line.startswith(">"):
            if chunks:
                yield "".join(chunks)
            chunks = []
        elif not line.startswith(";"):
            chunk = "".join(line.split())
            if not chunk:
                continue
            if chunks is None:
                raise ValueError(f"{path}:{lineno}: sequence data before the first '>' header line")
            chunks.append(chunk)
    if chunks:
        yield "".join(chunks)


def _split_if_single(documents: Iterator[str], val_fraction: float) -> Iterator[str]:
    """The documents unchanged, except that a lone document is cut in two at a line boundary."""
    first = next(documents, None)
    second = next(documents, None)
    if second is None:
        if first is None:
            return
        if val_fraction == 0:
            yield first
            return
        cut = round(len(first) * (1 - val_fraction))
        cut = first.rfind("\n", 0, cut) + 1 or cut
        yield first[:cut]
        yield first[cut:]
        return
    yield first
    yield second
    yield from documents


def _encode(tokenizer, text: str) -> tuple[np.ndarray, int]:
    """(token ids, UTF-8 bytes of the text)."""
    data = text.encode("utf-8")
    if type(tokenizer) is ByteTokenizer:
        return np.frombuffer(data, dtype=np.uint8), len(data)
    if type(tokenizer) is AminoAcidTokenizer:
        return tokenizer.encode_array(text), len(data)
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
        raise ValueError(
            f"tokenizer gave id {int(ids.max() if ids.max() >= tokenizer.vocab_size else ids.min())} outside "
            f"[0, vocab_size={tokenizer.vocab_size})"
        )
    return ids, len(data)


def _write_tokens(documents: Iterator[str], tokenizer, dtype: np.dtype, f) -> tuple[list, list]:
    """Write every non-empty document and its eos to the file ``f``; (tokens, bytes) per document."""
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    doc_tokens, doc_bytes = [], []
    block, block_len = [], 0
    for text in documents:
        if not text:
            continue
        ids, n_bytes = _encode(tokenizer, text)
        block += [ids.astype(dtype, copy=False), eos]
        block_len += len(ids) + 1
        doc_tokens.append(len(ids) + 1)
        doc_bytes.append(n_bytes)
        if block_len >= _WRITE_BLOCK:
            np.concatenate(block).tofile(f)
            block, block_len = [], 0
    if block:
        np.concatenate(block).tofile(f)
    return doc_tokens, doc_bytes


def _train_document_count(doc_tokens: list, val_fraction: float) -> int:
    n_docs = len(doc_tokens)
    if val_fraction == 0:
        return n_docs
    if n_docs < 2:
        raise ValueError(
            "the corpus is a single document too short to cut in two: a validation split needs at least two "
            "documents (or pass val_fraction=0)"
        )
    tail = np.cumsum(doc_tokens[::-1])
    n_val = int(np.searchsorted(tail, val_fraction * tail[-1])) + 1
    return n_docs - min(n_val, n_docs - 1)


# ---------------------------------------------------------------------------------------------
# Corpus


class Corpus:
    """A prepared corpus directory: its manifest and its tokens, memory-mapped read-only."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory = directory
        self.manifest = manifest
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]
        self.eos_token_id: int = manifest["tokenizer"]["eos_token_id"]
        self.dtype = np.dtype(manifest["dtype"])
        self._tokens = (
            np.memmap(directory / TOKENS_NAME, dtype=self.dtype, mode="r", shape=(manifest["n_tokens"],))
        )

    @classmethod
    def open(cls, directory: Union[str, os.PathLike]) -> "Corpus":
        """The corpus prepared in ``directory``; a missing or damaged manifest or token file is an error."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{directory} holds no prepared corpus ({MANIFEST_NAME} is missing): run prepare_corpus(source, "
                f"{str(directory)!r}) first"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{manifest_path} is corrupt ({e}): delete {directory} and prepare the corpus again"
            ) from e
        problem = _manifest_problem(manifest)
        if problem:
            raise ValueError(f"{manifest_path} is invalid: {problem}; delete {directory} and prepare the corpus again")
        tokens_path = directory / TOKENS_NAME
        if not tokens_path.is_file():
            raise FileNotFoundError(f"{tokens_path} is missing although {manifest_path} lists it: prepare again")
        expected = manifest["n_tokens"] * np.dtype(manifest["dtype"]).itemsize
        actual = tokens_path.stat().st_size
        if actual != expected:
            raise ValueError(
                f"{tokens_path} has {actual} bytes but {manifest_path} says {manifest['n_tokens']} {manifest['dtype']} "
                f"tokens ({expected} bytes): the file is truncated or from another run; prepare again"
            )
        return cls(directory, manifest)

    def tokens(self, split: str) -> np.memmap:
        """The tokens of ``split`` ("train" or "val"), read-only and memory-mapped."""
        s = self.manifest["splits"][check_split(split)]
        return self._tokens[s["start"] : s["stop"]]

    def n_tokens(self, split: str) -> int:
        s = self.manifest["splits"][check_split(split)]
        return s["stop"] - s["start"]

    def bytes_per_token(self, split: str) -> float:
        """Text bytes per token of ``split``: bits-per-byte = loss (nats) / ln 2 / bytes_per_token."""
        n = self.n_tokens(split)
        if n == 0:
            raise ValueError(f"split {split!r} is empty (the corpus was prepared with val_fraction=0)")
        return self.manifest["splits"][split]["n_bytes"] / n

    def load_tokenizer(self):
        """The tokenizer the corpus was prepared with (not available for a tokenizer object)."""
        info = self.manifest["tokenizer"]
        if info["kind"] == "byte":
            return ByteTokenizer()
        if info["kind"] == "amino":
            return AminoAcidTokenizer()
        if info.get("path"):
            return load_tokenizer(info["path"])
        raise ValueError(f"the corpus was prepared with a tokenizer object ({info['name']}) that cannot be reloaded")

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Corpus({str(self.directory)!r}, kind={m['kind']!r}, tokenizer={m['tokenizer']['name']!r}, "
            f"train={self.n_tokens('train')} tokens, val={self.n_tokens('val')} tokens)"
        )


def check_split(split) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    return split


def _manifest_problem(m) -> Optional[str]:
    """What is wrong with a manifest's structure, or None."""
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("format_version") != FORMAT_VERSION:
        return f"format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}"
    try:
        n = m["n_tokens"]
        train, val = m["splits"]["train"], m["splits"]["val"]
        ints = [n, m["tokenizer"]["vocab_size"], m["tokenizer"]["eos_token_id"]]
        ints += [s[k] for s in (train, val) for k in ("start", "stop", "n_bytes")]
    except (KeyError, TypeError) as e:
        return f"missing field {e}"
    if not all(isinstance(i, int) and i >= 0 for i in ints) or n == 0:
        return "token counts, ranges and the vocabulary must be non-negative integers, n_tokens positive"
    if m.get("dtype") not in ("uint16", "uint32"):
        return f"dtype {m.get('dtype')!r}, expected 'uint16' or 'uint32'"
    if not (train["start"] == 0 and train["stop"] == val["start"] and val["stop"] == n and train["stop"] <= n):
        return (
            f"the splits train [{train['start']}, {train['stop']}) val [{val['start']}, {val['stop']}) "
            f"do not cover [0, {n})"
        )
    return None
