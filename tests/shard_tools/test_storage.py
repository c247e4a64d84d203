"""shard_tools.storage: the loaders' only way to read a set (local files, file:// URLs; s3:// in test_s3.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shard_tools import storage
from shard_tools.format import ShardFormatError


def test_reads_whole_objects_ranges_and_sizes(tmp_path: Path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(100)))
    url = storage.join(str(tmp_path), "blob.bin")
    assert url == str(path) and storage.exists(url) and not storage.exists(url + ".missing")
    assert storage.size(url) == 100 and storage.read_bytes(url) == bytes(range(100))
    assert storage.read_range(url, 10, 5) == bytes([10, 11, 12, 13, 14])
    assert storage.read_range(url, 98, 10) == bytes([98, 99])  # short at the end: the caller checks
    assert storage.read_ranges(url, [(50, 2), (0, 1)]) == [bytes([50, 51]), bytes([0])]
    assert storage.read_range("file://" + url, 1, 1) == bytes([1])


def test_object_urls_join_with_slashes_and_unknown_schemes_are_refused():
    assert storage.join("s3://bucket/set/", "manifest.json") == "s3://bucket/set/manifest.json"
    # s3:// is read through shard_tools.s3 (tests/shard_tools/test_s3.py); other schemes are refused
    assert storage.is_remote("s3://bucket/set") and not storage.is_remote("/data/set")
    with pytest.raises(ShardFormatError, match="gs:// is not supported"):
        storage.read_bytes("gs://bucket/set/manifest.json")


def test_streams_names_and_worker_settings(tmp_path: Path, monkeypatch):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 10)
    assert b"".join(storage.stream(str(path), chunk=100)) == path.read_bytes()
    assert [len(block) for block in storage.stream(str(path), chunk=1000)] == [1000, 1000, 560]
    assert storage.name_of("s3://bucket/set/val-000000.tar") == "val-000000.tar" == storage.name_of(
        str(tmp_path / "val-000000.tar"))
    # a local set needs no AWS settings in the workers; an s3:// set takes this process's, exactly
    assert storage.environment(str(tmp_path)) is None
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    settings = storage.environment("s3://bucket/set")
    assert settings["AWS_REGION"] == "eu-west-1" and all(name.startswith("AWS_") for name in settings)
    monkeypatch.setenv("AWS_PROFILE", "stale")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    storage.apply_environment(settings)
    assert "AWS_PROFILE" not in os.environ and os.environ["AWS_REGION"] == "eu-west-1"
    storage.apply_environment(None)  # local set: left as they are
    assert os.environ["AWS_REGION"] == "eu-west-1"
