"""One writer per object-storage prefix: a push or pack to a prefix another writer holds is refused
in one line naming the holder; the marker is gone once the writer ends, failed or not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shard_tools import s3
from shard_tools.cli import main
from shard_tools.format import MANIFEST_NAME
from shard_tools.s3_claim import claim_prefix, marker_url

MARKER = ".mt-shard-writing"
_HOLDER = ("import sys; from shard_tools.s3_claim import claim_prefix\n"
           "with claim_prefix(sys.argv[1], 'mt-shard push'):\n"
           "    print('claimed', flush=True); sys.stdin.read()\n")


def test_a_second_writer_of_a_prefix_is_refused(s3_env: str, digits_shards: Path, capsys) -> None:
    url = f"{s3_env}/set"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline() == "claimed\n"  # the event: the marker is written
        for argv in (["push", str(digits_shards), url, "--quiet"], ["pack", "digits", url, "--quiet"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err == (f"mt-shard {argv[0]}: error: {url}: another mt-shard pack or push (PID {holder.pid} on "
                           f"{socket.gethostname()}, for 0 minutes) is writing this prefix; wait for it to finish; "
                           f"if it was killed, delete {url}{MARKER} and run the command again\n")
        assert s3.list_names(url) == [] and s3.exists(marker_url(url))  # nothing written beside the other writer
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    assert not s3.exists(marker_url(url))  # the holder took its marker away
    assert main(["push", str(digits_shards), url, "--quiet"]) == 0
    assert MANIFEST_NAME in s3.list_names(url) and not s3.exists(marker_url(url))


def test_the_marker_goes_when_the_writer_fails(s3_env: str) -> None:
    url = f"{s3_env}/failing"
    with pytest.raises(RuntimeError), claim_prefix(url, "mt-shard push"):
        assert s3.exists(marker_url(url)) and marker_url(url) == f"{url}{MARKER}"
        raise RuntimeError("the upload failed")
    assert not s3.exists(marker_url(url))


def test_a_dead_writers_marker_on_this_host_is_taken_over(s3_env: str, digits_shards: Path) -> None:
    url = f"{s3_env}/stale"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    assert holder.stdout.readline() == "claimed\n"
    holder.kill()  # SIGKILL: the marker stays behind
    assert holder.wait(timeout=60) == -9 and s3.exists(marker_url(url))
    assert main(["push", str(digits_shards), url, "--quiet"]) == 0
    assert MANIFEST_NAME in s3.list_names(url) and not s3.exists(marker_url(url))
