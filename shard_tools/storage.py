"""Where the loaders read a shard set from: every read goes through here, one call per byte span.

Local paths (or file:// URLs) for now; object storage joins here as ranged reads, so that a shard
span stays one request. OSError from a read propagates: the caller names the file and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from shard_tools.format import ShardFormatError

_FILE_SCHEME = "file://"


def _local(url: str) -> str:
    url = str(url)
    if url.startswith(_FILE_SCHEME):
        return url[len(_FILE_SCHEME):]
    if "://" in url:
        raise ShardFormatError(f"{url}: storage scheme not supported yet; copy the set to a local folder")
    return url


def join(base: str, name: str) -> str:
    """`name` inside the folder (or prefix) `base`."""
    base = str(base)
    if "://" in base:
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def exists(url: str) -> bool:
    return os.path.exists(_local(url))


def size(url: str) -> int:
    """Bytes in the object at `url`."""
    return os.stat(_local(url)).st_size


def read_bytes(url: str) -> bytes:
    with open(_local(url), "rb") as handle:
        return handle.read()


def read_range(url: str, start: int, length: int) -> bytes:
    """`length` bytes from offset `start` (fewer when the object ends first)."""
    return read_ranges(url, [(start, length)])[0]


def read_ranges(url: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Several (start, length) spans of one object, in the order given."""
    with open(_local(url), "rb") as handle:
        spans = []
        for start, length in ranges:
            handle.seek(start)
            spans.append(handle.read(length))
        return spans
