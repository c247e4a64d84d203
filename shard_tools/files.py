"""File helpers: every output is written under a temporary name and renamed when complete."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from shard_tools.errors import os_error_message

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


def partial_target(name: str) -> str | None:
    """The final name a `.<name>.partial` temporary stands for, or None for any other name."""
    if name.startswith(".") and name.endswith(PARTIAL_SUFFIX) and len(name) > len(PARTIAL_SUFFIX) + 1:
        return name[1 : -len(PARTIAL_SUFFIX)]
    return None


def is_set_file(name: str) -> bool:
    """A name a shard set holds: a shard, its index, manifest.json, labels.txt, train-classes.txt."""
    from shard_tools.format import LABELS_NAME, MANIFEST_NAME, TRAIN_CLASSES_NAME, is_shard_name

    if name.endswith(".idx"):
        name = name[:-4] + ".tar"
    return is_shard_name(name) or name in (MANIFEST_NAME, LABELS_NAME, TRAIN_CLASSES_NAME)


def remove_partials(folder: str | Path, ours: Callable[[str], bool] = is_set_file) -> None:
    """Drop what an interrupted run left half-written: only temporaries of names `ours` accepts (by
    default the set's own files), never a user's own `*.partial` file."""
    for leftover in Path(folder).glob("." + "*" + PARTIAL_SUFFIX):
        target = partial_target(leftover.name)
        if target is not None and ours(target) and leftover.is_file():
            leftover.unlink(missing_ok=True)


def check_output_location(path: str | Path, option: str) -> None:
    """Refuse, before any work, an output folder that cannot be created or written: a path under a
    regular file, a read-only or full file system, /proc. Leaves nothing behind."""
    from shard_tools.format import ShardFormatError

    path = Path(path).absolute()
    for existing in (path, *path.parents):
        try:
            is_dir = existing.is_dir()
            found = is_dir or existing.exists()
        except OSError as exc:
            raise ShardFormatError(f"{path}: cannot reach it ({os_error_message(exc)}); choose another {option}") from None
        if found:
            break
    if not is_dir:
        raise ShardFormatError(f"{path}: {existing} is a file, not a folder, so {option} cannot be made there; "
                               f"choose another {option}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mt-shard-probe-", dir=existing))
    except OSError as exc:
        inside = "" if existing == path else f" in {existing}"
        raise ShardFormatError(f"{path}: cannot write there{inside} ({exc.strerror or exc}); choose another {option}") from None


def make_dirs(path: str | Path) -> list[Path]:
    """mkdir -p that returns the folders it created (outermost first), so a failed run can remove them."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    created = []
    for folder in missing:
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError:
            remove_empty_dirs(created)
            raise
        created.append(folder)
    return created


def remove_empty_dirs(created: list[Path]) -> None:
    """Undo make_dirs for the folders still empty (innermost first)."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):  # not empty (kept on purpose) or already gone
            folder.rmdir()


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
