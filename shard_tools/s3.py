"""Shard sets in object storage: `s3://bucket/prefix` read and written through boto3.

Credentials, endpoint and region come from the standard AWS environment and config files
(AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3, AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
AWS_REGION, ~/.aws/config and ~/.aws/credentials), so any S3-compatible store works through its
endpoint. Transient failures are retried by botocore itself (standard retry mode: bounded attempts,
exponential backoff with jitter; AWS_MAX_ATTEMPTS overrides the count); a body cut off mid-read is
fetched again from where it stopped, with the same bound. Whatever still fails becomes one
ShardFormatError line naming the URL and the fix. Messages never carry credentials.

One client per process and environment, built lazily: a forked DataLoader worker builds its own
instead of reusing its parent's connection pool.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shard_tools.format import ShardFormatError
from shard_tools.s3_urls import SCHEME
from shard_tools.s3_urls import is_s3 as is_s3
from shard_tools.s3_urls import parse_url as parse_url

SHA256_METADATA = "sha256"  # object metadata (x-amz-meta-sha256) that push writes and resumes by
DEFAULT_MAX_ATTEMPTS = 5  # botocore's attempts per request, the first one included
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
MAX_POOL_CONNECTIONS = 32

# The environment a client is built from: a change to any of these (a test, a notebook) builds a new one.
_CLIENT_ENVIRONMENT = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED",
)

_clients: dict[tuple[int, str], tuple[object, int]] = {}  # per process: a client's connections are its own
_sessions: dict[str, tuple[object, object, int]] = {}  # per environment, shared with forked children
_clients_lock = threading.Lock()


def _forget_clients_after_fork() -> None:
    global _clients_lock
    _clients.clear()
    _clients_lock = threading.Lock()  # another thread may have held the old one at fork time


os.register_at_fork(after_in_child=_forget_clients_after_fork)


def join(base: str, name: str) -> str:
    """The URL of `name` inside the prefix `base`."""
    return base.rstrip("/") + "/" + name


def _object_key(url: str) -> tuple[str, str]:
    bucket, key = parse_url(url)
    if not key or key.endswith("/"):
        raise ShardFormatError(f"{url}: names a prefix, not an object; add the object name")
    return bucket, key


def _environment_fingerprint() -> str:
    # A hash, so no credential is kept in the cache key itself.
    values = "\0".join(os.environ.get(name, "\x01") for name in _CLIENT_ENVIRONMENT)
    return hashlib.sha256(values.encode()).hexdigest()


def _session(fingerprint: str) -> tuple[object, object, int]:
    """The boto3 session, client config and attempt count for one AWS environment, built once.

    Kept across fork (a session holds no connections): a loader worker, started anew each epoch, then
    builds its client from the loaded service model in ~20 ms instead of ~200 ms.
    """
    entry = _sessions.get(fingerprint)
    if entry is not None:
        return entry
    import botocore.session
    from boto3.session import Session
    from botocore.config import Config

    core = botocore.session.get_session()  # reads AWS_PROFILE, the config files and AWS_* variables
    try:
        attempts = int(core.get_config_variable("max_attempts") or DEFAULT_MAX_ATTEMPTS)
    except ValueError:
        raise ShardFormatError("AWS_MAX_ATTEMPTS (or the profile's max_attempts) is not a whole number; fix it") from None
    mode = "adaptive" if core.get_config_variable("retry_mode") == "adaptive" else "standard"
    config = Config(
        retries={"mode": mode, "total_max_attempts": attempts},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=MAX_POOL_CONNECTIONS,
    )
    entry = _sessions[fingerprint] = (Session(botocore_session=core), config, attempts)
    return entry


def _build_client(fingerprint: str) -> tuple[object, int]:
    session, config, attempts = _session(fingerprint)
    try:
        return session.client("s3", config=config), attempts  # type: ignore[attr-defined]
    except ValueError:  # botocore: "Invalid endpoint: ..." (the value is not shown: it may hold a secret)
        raise ShardFormatError("the S3 endpoint is not a URL; set AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3, the "
                               "profile's endpoint_url) like http://host:9000, or unset it for AWS itself") from None


def _client_and_attempts() -> tuple[object, int]:
    key = (os.getpid(), _environment_fingerprint())
    entry = _clients.get(key)
    if entry is None:
        with _clients_lock:
            entry = _clients.get(key)
            if entry is None:
                entry = _clients[key] = _build_client(key[1])
    return entry


def client() -> object:
    """This process's boto3 S3 client for the current AWS environment (built on first use)."""
    with translate_errors("s3://", "s3:ListBucket"):
        return _client_and_attempts()[0]


def reset_client() -> None:
    """Drop cached clients: the next call builds one from the environment as it is now."""
    with _clients_lock:
        _clients.clear()
        _sessions.clear()


def _endpoint() -> str:
    try:
        endpoint = _client_and_attempts()[0].meta.endpoint_url  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - only used to word a message
        return "the configured endpoint"
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")  # no user:password@


def _attempts() -> int:
    try:
        return _client_and_attempts()[1]
    except Exception:  # noqa: BLE001 - only used to word a message
        return DEFAULT_MAX_ATTEMPTS


_ENDPOINT_FIX = "check AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3, the profile's endpoint_url) and that the store is up"
_CREDENTIALS_FIX = ("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or the profile "
                    "AWS_PROFILE names in ~/.aws/credentials")


def _missing_bucket_line(url: str) -> str:
    bucket = url[len(SCHEME) :].partition("/")[0]
    return (f"{url}: no bucket {bucket!r} at {_endpoint()}; check the bucket name "
            "(and that AWS_ENDPOINT_URL / AWS_PROFILE point at the right store)")


def _client_error_line(url: str, error: Exception, permission: str) -> str:
    response = getattr(error, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    message = " ".join(str(response.get("Error", {}).get("Message", "")).split())
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    bucket = url[len(SCHEME) :].partition("/")[0]
    if code == "NoSuchBucket":
        return _missing_bucket_line(url)
    if code in ("NoSuchKey", "404", "NotFound"):
        return f"{url}: no such object at {_endpoint()}; check the prefix, or upload the set with mt-shard push"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                "TokenRefreshRequired", "InvalidSecurity"):
        return f"{url}: {_endpoint()} refused the credentials ({code}); {_CREDENTIALS_FIX}"
    if code in ("AccessDenied", "AllAccessDisabled", "403", "Forbidden") or status == 403:
        return (f"{url}: access denied ({code or status}); the credentials in use lack {permission} on bucket "
                f"{bucket!r}: grant it, or pick other credentials with AWS_PROFILE")
    if code == "InvalidRange":
        return (f"{url}: the range asked for lies past the object's end; the object does not match its "
                "index: push the set again (mt-shard push)")
    if code in ("PreconditionFailed", "412"):
        return f"{url}: the object changed while it was being read; read it again once the upload is finished"
    if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"):
        return (f"{url}: the store kept failing ({code or status}) after {_attempts()} attempts; "
                "try again later or raise AWS_MAX_ATTEMPTS")
    return f"{url}: S3 error {code or status} ({message}); check the URL and the store's settings"


@contextmanager
def translate_errors(url: str, permission: str) -> Iterator[None]:
    """Turn what boto3 raises into one ShardFormatError line naming `url` and the fix."""
    from boto3.exceptions import S3UploadFailedError
    from botocore import exceptions as boto
    from urllib3.exceptions import HTTPError as URLLib3Error

    try:
        yield
    except ShardFormatError:
        raise
    except boto.ClientError as exc:
        raise ShardFormatError(_client_error_line(url, exc, permission)) from None
    except S3UploadFailedError as exc:
        cause = exc.__context__
        if isinstance(cause, boto.ClientError):
            raise ShardFormatError(_client_error_line(url, cause, permission)) from None
        raise ShardFormatError(f"{url}: upload failed ({exc}); run the same command again to resume") from None
    except boto.NoCredentialsError:
        raise ShardFormatError(
            f"{url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
            "naming a profile in ~/.aws/credentials"
        ) from None
    except (boto.PartialCredentialsError, boto.CredentialRetrievalError) as exc:
        raise ShardFormatError(f"{url}: incomplete AWS credentials ({exc}); {_CREDENTIALS_FIX}") from None
    except boto.ProfileNotFound:
        raise ShardFormatError(
            f"{url}: AWS profile {os.environ.get('AWS_PROFILE') or os.environ.get('AWS_DEFAULT_PROFILE')!r} "
            "is not in ~/.aws/config; fix AWS_PROFILE or add the profile"
        ) from None
    except (boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError, URLLib3Error, ConnectionError) as exc:
        raise ShardFormatError(
            f"{url}: cannot reach the object store at {_endpoint()} after {_attempts()} attempts "
            f"({type(exc).__name__}); {_ENDPOINT_FIX}"
        ) from None
    except boto.BotoCoreError as exc:
        raise ShardFormatError(f"{url}: {type(exc).__name__}: {exc}; check the AWS settings") from None


def _body_errors() -> tuple[type[Exception], ...]:
    """What reading a response body raises when the connection breaks mid-read."""
    from botocore import exceptions as boto
    from urllib3.exceptions import HTTPError as URLLib3Error

    return (boto.ResponseStreamingError, boto.IncompleteReadError, boto.ReadTimeoutError,
            boto.ConnectionClosedError, URLLib3Error, ConnectionError)


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0, min(20.0, 2.0**attempt)))  # noqa: S311 - jitter, as botocore's standard mode


def _read_body(url: str, open_body: Callable[[object], object],
               read: Callable[[object], Iterable[bytes]]) -> Iterator[bytes]:
    """What `read(body)` gives of the body `open_body(client)` opens; a connection cut mid-read opens it
    again (with backoff, up to the client's attempt count), and whatever still fails is one line."""
    body_errors = _body_errors()
    attempt = 0
    while True:
        with translate_errors(url, "s3:GetObject"):
            s3_client, attempts = _client_and_attempts()
            body = open_body(s3_client)
            try:
                yield from read(body)
                return
            except body_errors:
                attempt += 1
                if attempt >= attempts:
                    raise
                body.close()  # type: ignore[attr-defined]
        _backoff(attempt)


def _get(url: str, start: int | None = None, length: int | None = None) -> bytes:
    bucket, key = _object_key(url)
    arguments = {"Bucket": bucket, "Key": key}
    if start is not None and length is not None:
        arguments["Range"] = f"bytes={start}-{start + length - 1}"
    # A cut body is read again whole: a range is one request.
    bodies = _read_body(url, lambda s3_client: s3_client.get_object(**arguments)["Body"],  # type: ignore[attr-defined]
                        lambda body: [body.read()])  # type: ignore[attr-defined]
    return b"".join(bodies)


def read_bytes(url: str) -> bytes:
    """The whole object (a manifest, an index, labels.txt)."""
    return _get(url)


def read_range(url: str, start: int, length: int) -> bytes:
    """`length` bytes from `start`, with one ranged GET."""
    if start < 0 or length < 0:
        raise ValueError(f"bad range: start {start}, length {length}")
    if length == 0:
        return b""
    data = _get(url, start, length)
    if len(data) != length:
        raise ShardFormatError(
            f"{url}: asked for {length} bytes at {start}, got {len(data)}; the object is shorter than its index "
            "says: push the set again (mt-shard push)"
        )
    return data


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    sha256: str | None  # from the object's metadata, where push stored it


def object_info(url: str) -> ObjectInfo | None:
    """Size and stored sha256 of an object; None when there is none (a missing bucket is an error)."""
    bucket, key = _object_key(url)
    from botocore.exceptions import ClientError

    with translate_errors(url, "s3:GetObject"):
        s3_client = _client_and_attempts()[0]
        try:
            head = s3_client.head_object(Bucket=bucket, Key=key)  # type: ignore[attr-defined]
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey", "NotFound"):
                raise
            head = None
        if head is None:
            # HEAD cannot tell a missing key from a missing bucket; a missing bucket is a misconfiguration.
            try:
                s3_client.head_bucket(Bucket=bucket)  # type: ignore[attr-defined]
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
                    raise ShardFormatError(_missing_bucket_line(url)) from None
                raise
            return None
    return ObjectInfo(int(head["ContentLength"]), head.get("Metadata", {}).get(SHA256_METADATA))


def exists(url: str) -> bool:
    """Whether the object is there (False for a missing key; a missing bucket raises)."""
    return object_info(url) is not None


def list_sizes(prefix_url: str) -> dict[str, int]:
    """{name relative to the prefix: size} of every object under `prefix_url`."""
    bucket, key = parse_url(prefix_url)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    sizes = {}
    with translate_errors(prefix_url, "s3:ListBucket"):
        paginator = _client_and_attempts()[0].get_paginator("list_objects_v2")  # type: ignore[attr-defined]
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for entry in page.get("Contents", []):
                sizes[entry["Key"][len(prefix) :]] = int(entry["Size"])
    return sizes


def list_names(prefix_url: str) -> list[str]:
    """Sorted names (relative to the prefix) of every object under `prefix_url`."""
    return sorted(list_sizes(prefix_url))


def upload_file(path: str | Path, url: str, sha256: str | None = None,
                callback: Callable[[int], object] | None = None) -> None:
    """Upload a local file (multipart when large), storing its sha256 as object metadata."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = _object_key(url)
    extra = {"Metadata": {SHA256_METADATA: sha256}} if sha256 else None
    with translate_errors(url, "s3:PutObject"):
        _client_and_attempts()[0].upload_file(  # type: ignore[attr-defined]
            str(path), bucket, key, ExtraArgs=extra, Callback=callback, Config=TransferConfig(max_concurrency=4)
        )


def stream(url: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The object's bytes in chunks, read once; a connection cut mid-object resumes where it stopped."""
    bucket, key = _object_key(url)
    offset = 0
    etag = None

    def open_body(s3_client) -> object:
        nonlocal etag
        arguments = {"Bucket": bucket, "Key": key}
        if offset:
            arguments.update(Range=f"bytes={offset}-", IfMatch=etag)  # the same object, from where it broke
        response = s3_client.get_object(**arguments)
        etag = etag or response.get("ETag")
        return response["Body"]

    for block in _read_body(url, open_body, lambda body: body.iter_chunks(chunk)):  # type: ignore[attr-defined]
        offset += len(block)
        yield block
