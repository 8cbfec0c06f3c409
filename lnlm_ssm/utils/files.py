"""Atomic file writes: a file under its final name is always complete.

Every writer of the package (checkpoints, exported models, corpora, manifests,
logs) goes through :func:`atomic_path`: the data goes to a temporary file beside
the target, which is fsynced and renamed over it, and the directory is fsynced
so that the rename itself survives a crash. An interrupted write leaves the old
file (or none) and at most a stray ``.<name>.*.tmp``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it becomes ``path``, on an error it is removed.

    The body writes the temporary file by any means (``open``, ``torch.save``,
    safetensors' ``save_file``, ...).
    """
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    fsync_directory(path.parent)


def atomic_write(path: PathLike, data: Union[bytes, str]) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    with atomic_path(path) as temp:
        temp.write_bytes(data.encode() if isinstance(data, str) else data)


def fsync_directory(directory: PathLike) -> None:
    """Make the renames in ``directory`` durable (a no-op where a directory cannot be opened, as on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
