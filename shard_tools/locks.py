"""One writer per folder: an exclusive OS lock on the folder itself, held while a command writes it.

The lock is `flock` on a descriptor of the folder (no lock file is left behind), so a killed writer
leaves no stale lock: the kernel drops it with the process. A second writer is refused at once
with one line naming the folder and the holder's PID (read from /proc/locks where there is one).
Locks are advisory and local to one machine's kernel (and to file systems that pass flock on);
object-storage prefixes are guarded separately (shard_tools.s3.claim_prefix).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from shard_tools.errors import UserError, os_error_message
from shard_tools.format import ShardFormatError

_PROC_LOCKS = "/proc/locks"
_held: dict[str, int] = {}  # folder (resolved) -> descriptor, for locks held until release or exit
_open: set[int] = set()  # every descriptor holding a lock in this process


def _close_in_child() -> None:
    """A forked child (a pack worker, a loader worker) drops its copies of the lock descriptors: the lock
    belongs to the writer alone, so it goes the moment the writer dies, whatever its workers do."""
    for descriptor in _open:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _open.clear()
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def lock_holder(descriptor: int) -> int | None:
    """The PID holding a flock on the file `descriptor` is open on, from /proc/locks (None if unknown)."""
    info = os.fstat(descriptor)
    wanted = (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
    try:
        with open(_PROC_LOCKS) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 08:01:1234567 0 EOF"; blocked waiters carry a "->" field
        if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
            continue
        try:
            major, minor, inode = fields[5].split(":")
            found = (int(major, 16), int(minor, 16), int(inode))
            pid = int(fields[4])
        except ValueError:
            continue
        if found == wanted:
            return pid
    return None


def lock_folder(folder: str | Path, *, who: str, fix: str, error: type[UserError] = ShardFormatError) -> int:
    """Take the exclusive lock on `folder` (which must exist); returns the descriptor that holds it.

    Refused with one `error` line: '<folder>: <who> (PID n) is writing this folder; <fix>'.
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"{os_error_message(exc, folder)}; cannot lock the folder; {fix}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = lock_holder(descriptor) if isinstance(exc, BlockingIOError) else None
        os.close(descriptor)
        if not isinstance(exc, BlockingIOError):
            raise error(f"{os_error_message(exc, folder)}; cannot lock the folder; {fix}") from None
        pid = f"PID {holder}" if holder is not None else "another process"
        raise error(f"{folder}: {who} ({pid}) is writing this folder; {fix}") from None
    _open.add(descriptor)
    return descriptor


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, who: str, fix: str, error: type[UserError] = ShardFormatError) -> Iterator[None]:
    """`with folder_lock(folder, ...):` the lock of `lock_folder`, released when the block ends."""
    descriptor = lock_folder(folder, who=who, fix=fix, error=error)
    try:
        yield
    finally:
        _open.discard(descriptor)
        os.close(descriptor)


def hold_folder(folder: str | Path, *, who: str, fix: str, error: type[UserError] = ShardFormatError) -> None:
    """Lock `folder` until `release_folder` or the end of the process; a folder this process already
    holds is not locked twice (a resumed run in the same process keeps its lock)."""
    key = os.path.realpath(folder)
    if key not in _held:
        _held[key] = lock_folder(folder, who=who, fix=fix, error=error)


def release_folder(folder: str | Path) -> None:
    """Drop the lock `hold_folder` took on `folder` (nothing when this process holds none)."""
    descriptor = _held.pop(os.path.realpath(folder), None)
    if descriptor is not None:
        _open.discard(descriptor)
        os.close(descriptor)
