"""One writer per object-storage prefix: a marker object, written first with a conditional put.

`mt-shard pack SRC s3://...` and `mt-shard push` write the marker `<prefix>.mt-shard-writing` (beside
the prefix, so the set's own objects are all a listing of the prefix shows) with If-None-Match: *
before any other object, and delete it when they end, failed or not. The store decides atomically
which of two writers creates it; the other is refused in one line naming the prefix and the holder
(PID and host, read from the marker).

A writer killed outright (SIGKILL) cannot delete its marker: a writer on the same host whose PID is
no longer running is taken over (a conditional put on the marker's ETag, so of two writers resuming
at once only one does). Limits: a marker left by a writer on another machine, or whose PID has been
reused, refuses the next writer with its age and the object to delete; the store must honour
conditional writes (AWS S3 since 2024, MinIO, moto; a store that ignores them lets two writers
through). Readers never look at the marker: a set is complete when its manifest is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from shard_tools import s3
from shard_tools.bounded import load_json
from shard_tools.format import ShardFormatError
from shard_tools.text import escaped

MARKER_NAME = ".mt-shard-writing"
_TAKEN = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def marker_url(url: str) -> str:
    """The marker of the prefix `url`: beside it (`s3://b/sets/x.mt-shard-writing`), inside for a bucket root."""
    bucket, key = s3.parse_url(url)
    return f"{s3.SCHEME}{bucket}/{key.rstrip('/')}{MARKER_NAME}" if key.strip("/") else s3.join(url, MARKER_NAME)


def _put(url: str, body: bytes, **condition: str) -> bool:
    """Write object `url` on `condition` (IfNoneMatch="*" or IfMatch=etag); False when it does not hold."""
    from botocore.exceptions import ClientError

    bucket, key = s3.parse_url(url)
    with s3.translate_errors(url, "s3:PutObject"):
        try:
            s3.client().put_object(Bucket=bucket, Key=key, Body=body, **condition)  # type: ignore[attr-defined]
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _TAKEN:
                return False
            raise
    return True


def _read_marker(marker: str) -> tuple[dict, str | None]:
    """The marker's record (empty when unreadable) and its ETag."""
    bucket, key = s3.parse_url(marker)
    try:
        with s3.translate_errors(marker, "s3:GetObject"):
            response = s3.client().get_object(Bucket=bucket, Key=key)  # type: ignore[attr-defined]
            record = load_json(response["Body"].read(1 << 16), marker, ShardFormatError, fix="")
        return (record if isinstance(record, dict) else {}), response.get("ETag")
    except ShardFormatError:
        return {}, None


def _dead_here(record: dict) -> bool:
    """Whether the marker's writer ran on this host and its PID runs no more."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _holder(record: dict) -> str:
    """'PID n on host h, for m minutes' from the marker's record, as far as it can be read."""
    try:
        minutes = (time.time() - float(record["started"])) / 60
        return f"PID {int(record['pid'])} on {escaped(record['host'], 60)}, for {minutes:.0f} minutes"
    except (ValueError, TypeError, KeyError):
        return "a writer whose marker cannot be read"


@contextmanager
def claim_prefix(url: str, who: str) -> Iterator[None]:
    """`with claim_prefix(url, "mt-shard push"):` the only writer of the prefix `url` until the block ends."""
    marker = marker_url(url)
    body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "by": who}).encode()
    if not _put(marker, body, IfNoneMatch="*"):
        record, etag = _read_marker(marker)
        if not (_dead_here(record) and etag and _put(marker, body, IfMatch=etag)):  # a dead writer's: take it over
            raise ShardFormatError(
                f"{url}: another mt-shard pack or push ({_holder(record)}) is writing this prefix; wait for it to "
                f"finish; if it was killed, delete {marker} and run the command again")
    try:
        yield
    except BaseException:
        with contextlib.suppress(ShardFormatError):  # the error that ended the write is the one to show
            _delete(marker)
        raise
    _delete(marker)


def _delete(url: str) -> None:
    bucket, key = s3.parse_url(url)
    with s3.translate_errors(url, "s3:DeleteObject"):
        s3.client().delete_object(Bucket=bucket, Key=key)  # type: ignore[attr-defined]
