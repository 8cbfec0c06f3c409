"""A text-to-text task that needs no download: a Python function's docstring -> the function's name.

The pairs come from the Python standard library's source (``data.corpus.default_corpus_dir``),
parsed with ``ast``: every public (not ``_``-prefixed) function or method with a
docstring gives ``{"input": <the docstring's first paragraph, whitespace collapsed,
at most max_input characters>, "target": <its name>}``. Installed packages
(``site-packages``) and test suites (directories named ``test``, ``tests``,
``idle_test``) are not read: they are not the stdlib's own functions. The split is by source file
(``file_split``: a hash of the file's path relative to the root, so it does not
depend on the machine or the order files are read), so no file gives both training
and test rows. Files that do not parse (the stdlib's test data has a few) are skipped.
"""

from __future__ import annotations

import ast
import json
import os
import zlib
from pathlib import Path
from typing import Iterator, Optional, Union

from lnlm_ssm.data.corpus import default_corpus_dir
from lnlm_ssm.utils.checks import check_positive_int

__all__ = ["docstring_pairs", "file_split", "write_jsonl"]

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# One file in TEST_EVERY (by the hash of its relative path) is a test file.
TEST_EVERY = 5


def file_split(relative_path: str) -> str:
    """"test" or "train": the split of a source file, from its path relative to the root."""
    return "test" if zlib.crc32(relative_path.replace(os.sep, "/").encode()) % TEST_EVERY == 0 else "train"


def _pairs_of(source: str, max_input: int) -> Iterator[dict[str, str]]:
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        summary = " ".join(doc.strip().split("\n\n")[0].split())
        if summary:
            yield {"input": summary[:max_input], "target": node.name}


def docstring_pairs(
    split: str, *, root: Optional[Union[str, os.PathLike]] = None, max_input: int = 200, max_files: Optional[int] = None
) -> list[dict[str, str]]:
    """The pairs of ``split`` ("train" or "test") from the ``.py`` files under ``root`` (default: the stdlib),
    in sorted path order; ``max_files``: read at most that many of the split's files."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    check_positive_int("max_input", max_input)
    root = Path(root) if root is not None else default_corpus_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"root must be a directory of Python source; {str(root)!r} is not one")
    files = [
        path for path in sorted(root.rglob("*.py"))
        if not SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])
        and file_split(str(path.relative_to(root))) == split
    ]
    pairs = []
    for path in files[:max_files]:
        try:
            pairs.extend(_pairs_of(path.read_text(encoding="utf-8"), max_input))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # the stdlib ships deliberately broken files (lib2to3 and test data)
    return pairs


def write_jsonl(rows: list[dict[str, str]], path: Union[str, os.PathLike]) -> Path:
    """``rows`` as a JSONL file (one object a line) at ``path``."""
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
