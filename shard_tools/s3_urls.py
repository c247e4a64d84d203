"""`s3://bucket/prefix` URLs: recognised and parsed once, strictly, before anything reaches boto3."""

from __future__ import annotations

import re

from shard_tools.format import ShardFormatError
from shard_tools.text import plain_or_quoted, quoted

SCHEME = "s3://"


def is_s3(url: object) -> bool:
    """Whether `url` names object storage (an `s3://` URL) rather than a local path."""
    return isinstance(url, str) and url.startswith(SCHEME)


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's bucket naming rules
_IP_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_URL_FORM = "write it as s3://bucket/prefix"


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`, parsed strictly; the key may be empty (the bucket's root) or a
    prefix (a trailing slash allowed).

    Refused with one line: a bucket name S3 would refuse, credentials in the URL (never echoed),
    empty, `.` or `..` path segments, white space, backslashes and control characters.
    """
    if not is_s3(url):
        raise ShardFormatError(f"{plain_or_quoted(url)}: not an s3:// URL; {_URL_FORM}")
    bucket, _, key = url[len(SCHEME) :].partition("/")
    if "@" in bucket:  # user:password@: refused without repeating the URL, which holds the secret
        raise ShardFormatError("an s3:// URL with credentials in it (user:password@) is refused and not shown; "
                               "give credentials through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                               f"and {_URL_FORM}")
    if not bucket:
        raise ShardFormatError(f"{plain_or_quoted(url)}: names no bucket; {_URL_FORM}")
    if not _BUCKET.match(bucket) or ".." in bucket or _IP_ADDRESS.match(bucket):
        raise ShardFormatError(f"{plain_or_quoted(url)}: {quoted(bucket)} is not a valid bucket name (3-63 lower-case letters, "
                               f"digits, dots and hyphens, starting and ending with a letter or digit); {_URL_FORM}")
    segments = key[:-1].split("/") if key.endswith("/") else key.split("/")
    if key and any(segment in ("", ".", "..") for segment in segments):
        raise ShardFormatError(f"{plain_or_quoted(url)}: has an empty, '.' or '..' path segment; {_URL_FORM}")
    if any(not char.isprintable() or char.isspace() or char == "\\" for char in key):
        raise ShardFormatError(f"{plain_or_quoted(url)}: has white space, a backslash or a control character; {_URL_FORM}")
    return bucket, key

