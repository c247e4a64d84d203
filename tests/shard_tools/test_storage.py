"""shard_tools.storage: the loaders' only way to read a set (local files, file:// URLs; s3:// in test_s3.py)."""

from __future__ import annotations

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
