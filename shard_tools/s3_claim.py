"""One writer per object-storage prefix: a marker object, written first with a conditional put.

`mt-shard pack SRC s3://...` and `mt-shard push` write `<prefix>/.mt-shard-writing` with
If-None-Match: * before any other object, and delete it when they end, failed or not. The store
decides atomically which of two writers creates it; the other is refused in one line naming the
prefix and the holder (PID and host, read from the marker).

Limits: a writer killed outright (SIGKILL, a lost machine) cannot delete its marker; the next writer
is then refused with the marker's age and the command that removes it. The store must honour
conditional writes (AWS S3 since 2024, MinIO, moto; a store that ignores If-None-Match lets two writers
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
from shard_tools.format import ShardFormatError
from shard_tools.text import escaped

MARKER_NAME = ".mt-shard-writing"
_TAKEN = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _put_new(url: str, body: bytes) -> bool:
    """Write object `url` only if there is none (If-None-Match: *); False when one is there already."""
    from botocore.exceptions import ClientError

    bucket, key = s3.parse_url(url)
    with s3.translate_errors(url, "s3:PutObject"):
        try:
            s3.client().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")  # type: ignore[attr-defined]
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _TAKEN:
                return False
            raise
    return True


def _holder(marker: str) -> str:
    """'PID n on host h, for m minutes' from the marker, as far as it can be read."""
    try:
        record = json.loads(s3.read_bytes(marker))
        minutes = (time.time() - float(record["started"])) / 60
        return f"PID {int(record['pid'])} on {escaped(record['host'], 60)}, for {minutes:.0f} minutes"
    except (ShardFormatError, ValueError, TypeError, KeyError):
        return "a writer whose marker cannot be read"


@contextmanager
def claim_prefix(url: str, who: str) -> Iterator[None]:
    """`with claim_prefix(url, "mt-shard push"):` the only writer of the prefix `url` until the block ends."""
    marker = s3.join(url, MARKER_NAME)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "by": who}
    if not _put_new(marker, json.dumps(record).encode()):
        raise ShardFormatError(
            f"{url}: another mt-shard pack or push ({_holder(marker)}) is writing this prefix; wait for it to "
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
