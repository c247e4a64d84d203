"""The shard format module: label encodings, names, keys, DALI indexes and the manifest."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest

from shard_tools.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ShardFormatError,
    build_index,
    decode_class,
    decode_label,
    encode_class,
    encode_label,
    index_name,
    is_valid_key,
    parse_index,
    shard_name,
)
from shard_tools.manifest import Manifest, SplitInfo, read_manifest, shard_paths


def test_label_encodings_round_trip_and_bytes():
    assert encode_label(7) == b"\x07\x00\x00\x00"
    assert encode_label(-1) == b"\xff\xff\xff\xff"
    assert [decode_label(encode_label(v)) for v in (-1, 0, 1, 999)] == [-1, 0, 1, 999]
    assert encode_class(-1) == b"-1" and encode_class(12) == b"12"
    assert decode_class(b"12\n") == 12 and decode_class(b"-1") == -1


def test_names_and_keys():
    assert shard_name("train-labeled", 3) == "train-labeled-000003.tar"
    assert index_name("val-000000.tar") == "val-000000.idx"
    assert is_valid_key("n01440764-n01440764_10026")
    assert not is_valid_key("a.b") and not is_valid_key("a/b") and not is_valid_key("") and not is_valid_key("x" * 91)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_build_index_by_hand(tmp_path: Path):
    # Two samples; offsets are header blocks of 512 bytes plus data padded to 512.
    path = tmp_path / "s.tar"
    path.write_bytes(_tar([("a.cls", b"1"), ("a.jpg", b"x" * 600), ("b.cls", b"2")]))
    assert build_index(path) == "v1.2 2\ncls 512 1 a.cls jpg 1536 600 a.jpg\ncls 3072 1 b.cls\n"
    assert parse_index(build_index(path)) == [("a", {"cls": (512, 1), "jpg": (1536, 600)}), ("b", {"cls": (3072, 1)})]


def test_build_index_matches_dali_wds2idx(digits_shards: Path, tmp_path: Path):
    spec = importlib.util.find_spec("wds2idx")
    if spec is None:
        pytest.skip("DALI's wds2idx is not installed")
    from wds2idx import IndexCreator

    for tar in sorted(digits_shards.glob("*.tar"))[:3]:
        reference = tmp_path / "ref.idx"
        with IndexCreator(str(tar), str(reference), verbose=False) as creator:
            creator.create_index()
        assert (digits_shards / index_name(tar.name)).read_text() == reference.read_text()


def test_parse_index_rejects_bad_text():
    with pytest.raises(ShardFormatError):
        parse_index("v1.2 2\ncls 512 1 a.cls\n", "x.idx")
    with pytest.raises(ShardFormatError):
        parse_index("garbage", "x.idx")


def test_empty_tar_has_no_index(tmp_path: Path):
    path = tmp_path / "e.tar"
    path.write_bytes(_tar([]))
    with pytest.raises(ShardFormatError, match="no samples"):
        build_index(path)


def _manifest() -> Manifest:
    return Manifest(
        classes=["cat", "dog"],
        splits={"val": SplitInfo(shards=["val-000000.tar"], counts=[3], sha256=["ab"], bytes=[10])},
        label_split={"method": "all", "seed": 0},
        image={"max_side": None, "quality": 90},
    )


def test_manifest_round_trip(tmp_path: Path):
    manifest = _manifest()
    (tmp_path / MANIFEST_NAME).write_text(manifest.to_json())
    loaded = read_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.num_classes == 2 and loaded.split("val").num_samples == 3
    assert loaded.split("train-labeled").num_samples == 0
    assert shard_paths(tmp_path, "val") == [str(tmp_path / "val-000000.tar")]


def test_read_manifest_errors(tmp_path: Path):
    with pytest.raises(ShardFormatError, match="no such shard set folder"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ShardFormatError, match="missing"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ShardFormatError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path)
    data = json.loads(_manifest().to_json())
    data["format_version"] = FORMAT_VERSION + 1
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ShardFormatError, match="newer"):
        read_manifest(tmp_path)
    del data["classes"]
    data["format_version"] = FORMAT_VERSION
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ShardFormatError, match="not a valid"):
        read_manifest(tmp_path)
