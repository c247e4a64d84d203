"""The files inside a downloaded archive, found and read without extracting it.

`archive_format` tells an archive from a file list by its first bytes, `archive_layout` one archive
layout from another by its first member. `tar_files` lists where every
regular file's bytes lie in an uncompressed tar (also a tar inside a tar, read through a window that
stops at its end), so an image is an `ArchiveMember`: read later with one seek and one read.
`small_members` reads the few small files a compressed archive is wanted for (CIFAR's batches, the
ImageNet devkit's). Member names are cleaned of `..` and leading `/`; nothing is ever extracted.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from shard_tools.format import ShardFormatError
from shard_tools.imaging import BadImage

# The archive layouts `archive_layout` tells apart (CIFAR's are named here; shard_tools.sources.cifar reads them).
CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
KNOWN_LAYOUTS = ("ILSVRC2012_img_train.tar (one <wnid>.tar per class), a flat val tar with --val, "
                 "or cifar-10-binary.tar.gz")
MAX_SMALL_MEMBER = 64 << 20  # CIFAR batches (30 MB) and devkit files: anything larger is not one
_MAGIC = {b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"PK\x03\x04": "zip"}


@dataclass(frozen=True)
class ArchiveMember:
    """Where an image's bytes lie inside an uncompressed archive; an `Item.path` of archive sources."""

    archive: str
    offset: int
    size: int

    def read(self) -> bytes:
        """The member's bytes: one seek and one read; a damaged archive raises BadImage (the image is skipped)."""
        try:
            with open(self.archive, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(self.size)
        except OSError as exc:
            raise BadImage(f"unreadable: {exc.strerror or exc}") from None
        if len(data) != self.size:
            raise BadImage("truncated: the archive ends inside this member")
        return data


def archive_format(path: str | Path) -> str | None:
    """'tar', 'gzip', 'bzip2', 'xz' or 'zip' from the first bytes; None for anything else (a list)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:
        return None
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":  # the block magic too: a list may start with "BZh"
        return "bzip2"
    return "tar" if head[257:262] == b"ustar" else None


def is_archive(path: str | Path) -> bool:
    """Whether `path` starts like a tar, gzip, bzip2, xz or zip archive."""
    return archive_format(path) is not None


def _first_member(path: Path, compression: str) -> str:
    """The name of the archive's first regular file, to tell the layouts apart."""
    mode = {"tar": "r:", "gzip": "r:gz", "bzip2": "r:bz2", "xz": "r:xz"}[compression]
    try:
        with tarfile.open(path, mode) as archive:
            for member in archive:
                if member.isfile():
                    return clean_name(member.name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise damaged_archive(path, exc) from None
    raise ShardFormatError(f"{path}: the archive holds no files; expected {KNOWN_LAYOUTS}")


def archive_layout(path: Path) -> str:
    """'ilsvrc-train', 'flat' or 'cifar-binary'; raises for the pickled CIFAR and anything unknown."""
    compression = archive_format(path)
    if compression == "zip":
        raise ShardFormatError(f"{path}: a zip archive; expected {KNOWN_LAYOUTS}")
    first = _first_member(path, compression)
    top = first.split("/", 1)[0]
    if top.startswith("cifar") and (top.endswith("-py") or top.endswith("-python")):
        raise ShardFormatError(
            f"{path}: the python version of CIFAR holds pickles, which mt-shard never loads; download the "
            f"binary version ({CIFAR_BINARY_URL}) and pack that"
        )
    if top == CIFAR_DIR:
        return "cifar-binary"
    if compression != "tar":
        raise ShardFormatError(f"{path}: a {compression}-compressed archive of an unknown layout; expected "
                               f"{KNOWN_LAYOUTS} (decompress a compressed ImageNet tar first: images are read by offset)")
    return "ilsvrc-train" if first.endswith(".tar") else "flat"


def damaged_archive(path: Path, exc: BaseException | str) -> ShardFormatError:
    """The one error for an archive that cannot be read: name it and ask for a new download."""
    return ShardFormatError(f"{path}: damaged archive ({exc}); download it again")


def clean_name(name: str) -> str:
    """A member name as a relative path: no leading './' or '/', no '..' parts (never extracted anyway)."""
    return "/".join(part for part in name.replace("\\", "/").split("/") if part not in ("", ".", ".."))


class _Window(io.RawIOBase):
    """A read-only view of `size` bytes of `handle` from `start`: an inner tar inside the outer one.

    Reads stop at the window's end, so a damaged inner tar can never run into the next class's tar.
    """

    def __init__(self, handle: BinaryIO, start: int, size: int) -> None:
        super().__init__()
        self._handle, self._start, self._size, self._position = handle, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._size - self._position))
        if not count:
            return 0
        self._handle.seek(self._start + self._position)
        got = self._handle.readinto(memoryview(buffer)[:count]) or 0
        self._position += got
        return got


def tar_files(
    path: Path, handle: BinaryIO, start: int = 0, size: int | None = None, where: str = ""
) -> list[tuple[str, int, int]]:
    """(clean name, absolute data offset, size) of every regular file of the tar at `start`."""
    end = os.fstat(handle.fileno()).st_size
    if size is not None:
        end = min(end, start + size)
    fileobj = handle if size is None else _Window(handle, start, size)
    files = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as archive:
            for member in archive:
                if member.isfile():
                    offset = start + member.offset_data
                    if offset + member.size > end:
                        raise tarfile.ReadError(f"{where}{member.name} runs past the end")
                    files.append((clean_name(member.name), offset, member.size))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise damaged_archive(path, exc) from None
    return files


def small_members(path: Path, wanted: Callable[[str], str | None]) -> dict[str, bytes]:
    """The bytes of the archive's files for which `wanted(clean name)` gives a key, by that key."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                key = wanted(clean_name(member.name)) if member.isfile() else None
                if key is None:
                    continue
                if member.size > MAX_SMALL_MEMBER:
                    raise ShardFormatError(f"{path}: {member.name} is {member.size} bytes, too large to be "
                                           "what it is named; download the archive again")
                found[key] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise damaged_archive(path, exc) from None
    return found
