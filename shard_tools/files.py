"""File helpers: every output is written under a temporary name and renamed when complete."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | Path) -> Path:
    """The temporary name a file is written under: hidden, so no reader globbing `*.tar` sees it."""
    path = Path(path)
    return path.with_name("." + path.name + PARTIAL_SUFFIX)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` through its temporary name (see `atomic_output`)."""
    with atomic_output(path) as temp:
        temp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """`with atomic_output(path) as temp:` write `temp` (streamed, any library); renamed to `path` on success.

    On any failure the temporary file is removed, and an OS error about it names `path` instead.
    """
    path = Path(path)
    temp = partial_path(path)
    try:
        yield temp
        os.replace(temp, path)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) == str(temp):
            exc.filename = str(path)
        raise


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


def read_pairs(path: str | Path, what: str, columns: str, fix: str) -> list[tuple[str, str, str]]:
    """Parse `<left> <right>` lines (`#` comments, blank lines skipped) of a file list or labels file.

    Returns (left, right, "file:line") triples; the right column is the last word, so the left one
    may hold spaces. `what` names the file in messages, `columns` the expected line, `fix` the remedy.
    """
    from shard_tools.format import ShardFormatError

    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ShardFormatError(f"{path}: cannot read the {what} ({exc}); {fix}") from None
    entries = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(None, 1)
        if len(parts) != 2:
            raise ShardFormatError(f"{path}:{number}: expected '{columns}', got {text!r}")
        entries.append((parts[0], parts[1], f"{path}:{number}"))
    if not entries:
        raise ShardFormatError(f"{path}: the {what} names no image; write '{columns}' lines")
    return entries
