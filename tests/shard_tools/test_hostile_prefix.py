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
from shard_tools.s3_claim import MARKER_NAME, claim_prefix

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
                           f"if it was killed, delete {url}/{MARKER_NAME} and run the command again\n")
        assert s3.list_names(url) == [MARKER_NAME]  # nothing written beside the other writer
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    assert s3.list_names(url) == []  # the holder took its marker away
    assert main(["push", str(digits_shards), url, "--quiet"]) == 0
    names = s3.list_names(url)
    assert MANIFEST_NAME in names and MARKER_NAME not in names


def test_the_marker_goes_when_the_writer_fails(s3_env: str) -> None:
    url = f"{s3_env}/failing"
    with pytest.raises(RuntimeError), claim_prefix(url, "mt-shard push"):
        assert s3.list_names(url) == [MARKER_NAME]
        raise RuntimeError("the upload failed")
    assert s3.list_names(url) == []
