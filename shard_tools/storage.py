"""Where a shard set is read from: every read goes through here, one call per byte span.

A local path (or file:// URL) is read from disk; an `s3://bucket/prefix` URL through shard_tools.s3
(boto3, imported only when an s3:// URL is read), with one ranged GET per span, so that a shard span
stays one request. Local OSError propagates (the caller names the file and the fix); object storage
failures are already one ShardFormatError line naming the URL and the fix.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator, Mapping, Sequence

from shard_tools.format import ShardFormatError
from shard_tools.text import plain_or_quoted

_FILE_SCHEME = "file://"
_S3_SCHEME = "s3://"
_AWS_PREFIX = "AWS_"


def is_remote(url: object) -> bool:
    """Whether `url` names object storage (read over the network) rather than a local path."""
    return isinstance(url, str) and url.startswith(_S3_SCHEME)


_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # scheme:/... : meant as a URL, whatever follows


def check_location(location: str | os.PathLike) -> str:
    """A set's location as given, checked once: an s3:// URL parsed strictly (shard_tools.s3.parse_url), a
    file:// URL, or a local path. Text that looks like a URL but is not one (`s3:/bucket/x`, `gs://x`) is
    refused rather than taken as a local folder; a URL with credentials in it is refused without being shown.
    """
    text = str(location)
    if is_remote(text):
        _s3().parse_url(text)
        return text
    if text.startswith(_FILE_SCHEME) or not _URL_LIKE.match(text):
        return text
    scheme, _, rest = text.partition(":")
    if "@" in rest.lstrip("/").partition("/")[0]:
        raise ShardFormatError("a URL with credentials in it (user:password@) is refused and not shown; use a local "
                               "folder or s3://bucket/prefix with credentials in the AWS_* environment")
    if "://" in text:
        raise ShardFormatError(f"{plain_or_quoted(text)}: storage scheme {plain_or_quoted(scheme)}:// is not supported; "
                               "use a local folder or s3://bucket/prefix")
    raise ShardFormatError(f"{plain_or_quoted(text)}: looks like a URL but is not one (an s3:// URL has two slashes: "
                           f"s3://bucket/prefix); for a local folder of that name, write ./{plain_or_quoted(text)}")


def _s3():
    from shard_tools import s3  # boto3 and botocore load only when an s3:// set is read

    return s3


def _local(url: str) -> str:
    url = str(url)
    if url.startswith(_FILE_SCHEME):
        return url[len(_FILE_SCHEME):]
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ShardFormatError(f"{url}: storage scheme {scheme}:// is not supported; use a local folder or "
                               "s3://bucket/prefix")
    return url


def join(base: str, name: str) -> str:
    """`name` inside the folder (or prefix) `base`."""
    base = str(base)
    if "://" in base:
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def name_of(url: str) -> str:
    """The last part of a path or URL (the object's file name)."""
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def exists(url: str) -> bool:
    """Whether the file (object) is there; for object storage a missing bucket raises instead."""
    if is_remote(url):
        return _s3().exists(url)
    return os.path.exists(_local(url))


def size(url: str) -> int:
    """Bytes in the object at `url` (FileNotFoundError when there is none)."""
    if is_remote(url):
        info = _s3().object_info(url)
        if info is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", url)
        return info.size
    return os.stat(_local(url)).st_size


def read_bytes(url: str) -> bytes:
    """The whole file (object): one GET in object storage."""
    if is_remote(url):
        return _s3().read_bytes(url)
    with open(_local(url), "rb") as handle:
        return handle.read()


def read_range(url: str, start: int, length: int) -> bytes:
    """`length` bytes from offset `start` with one read (one ranged GET); fewer when a local file ends first
    (object storage raises instead)."""
    if is_remote(url):
        return _s3().read_range(url, start, length)
    return read_ranges(url, [(start, length)])[0]


def read_ranges(url: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Several (start, length) spans of one object, in the order given.

    Object storage: ONE ranged GET from the lowest start to the highest end, cut into the spans, so
    ask for nearby spans (one shard's, for one reader) and never one request per sample.
    """
    if is_remote(url):
        if not ranges:
            return []
        low = min(start for start, _ in ranges)
        high = max(start + length for start, length in ranges)
        span = _s3().read_range(url, low, high - low)
        return [span[start - low:start - low + length] for start, length in ranges]
    with open(_local(url), "rb") as handle:
        spans = []
        for start, length in ranges:
            handle.seek(start)
            spans.append(handle.read(length))
        return spans


def stream(url: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The file's bytes in chunks, read once from start to end (object storage: one streamed GET)."""
    if is_remote(url):
        yield from _s3().stream(url, chunk)
        return
    with open(_local(url), "rb") as handle:
        while block := handle.read(chunk):
            yield block


def environment(url: str) -> dict[str, str] | None:
    """The AWS settings a reader of `url` needs (None for a local set), to hand to worker processes.

    DataLoader workers start from a forkserver that may have started before these were set (a
    notebook, a test): a worker applies them with `apply_environment`. They travel only to our own
    worker processes, never into a config, a log or a report.
    """
    if not is_remote(url):
        return None
    return {name: value for name, value in os.environ.items() if name.startswith(_AWS_PREFIX)}


def apply_environment(settings: Mapping[str, str] | None) -> None:
    """Make this process's AWS_* variables exactly `settings` (from `environment`); None: leave them."""
    if settings is None:
        return
    for name in [name for name in os.environ if name.startswith(_AWS_PREFIX) and name not in settings]:
        del os.environ[name]
    os.environ.update(settings)
