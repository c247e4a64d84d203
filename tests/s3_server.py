"""A real S3 server for tests: moto's server in its own process on a free 127.0.0.1 port.

Nothing is mocked in the test process: the code under test talks HTTP to this server, found through
AWS_ENDPOINT_URL as a user's store would be. tests/conftest.py exposes the fixtures below:

- `s3_server` (session): the running server; `.requests()` is its request log (method, path) in the
  order the server received them (each written before it is answered, so a request whose answer the
  client has is always there), `.enforce_auth()` turns on moto's IAM checks for a `with` block.
- `s3_env` (function): the AWS environment pointed at the server (dummy credentials, no config
  files, no instance metadata) and a fresh bucket; returns `s3://<bucket>`.
- `start_s3_server` (function): starts a private server a test may stop (server-gone cases).
- `pushed_digits` (session): the session's digits set pushed once to the session's server; returns its
  s3:// URL, for the tests that only read a pushed set (with `s3_env` for the environment).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ACCESS_KEY_ID = "testing-key-id"
SECRET_ACCESS_KEY = "testing-secret-do-not-print"
REGION = "us-east-1"
_LOG_LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+"')


# moto's server (as `python -m moto.server` runs it) behind a WSGI layer that logs each request before
# moto answers it. It binds port 0 itself and, once listening, writes the port on stdout (its only
# line there): the test waits on that line, not on polling. argv: host, request log
SERVER = """
import os, sys, threading
from werkzeug.serving import make_server
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

host, log_path = sys.argv[1], sys.argv[2]
log, lock, app = open(log_path, "a", buffering=1), threading.Lock(), []

def logged(environ, start_response):
    with lock:
        log.write(f'"{environ["REQUEST_METHOD"]} {environ["RAW_URI"]} HTTP/1.1"\\n')
    return app[0](environ, start_response)

server = make_server(host, 0, logged, threaded=True, request_handler=MotoRequestHandler)
os.environ["MOTO_PORT"] = str(server.server_port)
app.append(DomainDispatcherApplication(create_backend_app))
sys.stdout.write(f"{server.server_port}\\n")
sys.stdout.flush()
os.dup2(2, 1)  # anything printed later goes to the server's log
server.serve_forever()
"""


class MotoServer:
    """moto's S3 server in a subprocess; started by `start()`, ended by `stop()`."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path  # the server's output
        self.request_log = log_path.with_suffix(".requests")
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        """Start the server and return once it listens (it reports its port when it does)."""
        environment = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
        environment.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", SERVER, "127.0.0.1", str(self.request_log)],
                stdout=subprocess.PIPE, stderr=log, env=environment,
            )
        line = self.process.stdout.readline()  # the port once listening; end-of-file if the server died
        self.process.stdout.close()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"moto server did not start; see {self.log_path}")
        self.port = int(line)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _post(self, path: str, body: bytes) -> None:
        request = urllib.request.Request(f"{self.endpoint}{path}", data=body, method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()

    @contextlib.contextmanager
    def enforce_auth(self) -> Iterator[None]:
        """moto's IAM authentication and authorisation on (unknown keys refused, policies applied)."""
        self._post("/moto-api/reset-auth", b"0")
        try:
            yield
        finally:
            self._post("/moto-api/reset-auth", b"inf")

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request the server has received, in order (each logged before it
        is answered)."""
        if not self.request_log.exists():
            return []
        return _LOG_LINE.findall(self.request_log.read_text(errors="replace"))

    def environ(self) -> dict[str, str]:
        """AWS variables that point a client at this server with dummy credentials and nothing else."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # no credential lookups that wait on 169.254.169.254
            "AWS_CONFIG_FILE": os.devnull,  # the developer's ~/.aws must not leak in
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }


def apply_environ(monkeypatch: pytest.MonkeyPatch, server: MotoServer) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in server.environ().items():
        monkeypatch.setenv(name, value)


def create_bucket(server: MotoServer, name: str | None = None) -> str:
    import boto3

    name = name or f"mt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=ACCESS_KEY_ID,
                 aws_secret_access_key=SECRET_ACCESS_KEY, region_name=REGION).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "server.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The AWS environment pointed at the session's server, and a fresh bucket: returns s3://bucket."""
    apply_environ(monkeypatch, s3_server)
    return f"s3://{create_bucket(s3_server)}"


@pytest.fixture(scope="session")
def pushed_digits(s3_server: MotoServer, digits_shards: Path) -> str:
    from shard_tools.push import push

    with pytest.MonkeyPatch.context() as monkeypatch:
        apply_environ(monkeypatch, s3_server)
        url = f"s3://{create_bucket(s3_server)}/digits"
        push(digits_shards, url, workers=4, progress=False)
    return url


@pytest.fixture
def start_s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], MotoServer]]:
    """Start a private server (environment pointed at it); every one started is stopped after the test."""
    started: list[MotoServer] = []

    def start() -> MotoServer:
        server = MotoServer(tmp_path / f"moto-{len(started)}.log").start()
        started.append(server)
        apply_environ(monkeypatch, server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
