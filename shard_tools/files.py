"""File helpers: every output is written under a temporary name and renamed when complete."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | Path) -> Path:
    """The temporary name a file is written under: hidden, so no reader globbing `*.tar` sees it."""
    path = Path(path)
    return path.with_name("." + path.name + PARTIAL_SUFFIX)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    temp = partial_path(path)
    with open(temp, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    os.replace(temp, path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_partials(folder: str | Path) -> None:
    """Drop what an interrupted run left half-written."""
    for leftover in Path(folder).glob("." + "*" + PARTIAL_SUFFIX):
        leftover.unlink(missing_ok=True)
