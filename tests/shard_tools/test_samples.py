"""Generated photo trees: layout, sizes, counts per class, determinism."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from shard_tools.samples import write_photo_tree


def test_photo_tree_layout_and_determinism(photo_tree: Path, tmp_path: Path):
    train = sorted((photo_tree / "train").rglob("*.JPEG"))
    val = sorted((photo_tree / "val").rglob("*.JPEG"))
    assert len(train) == 64 and len(val) == 16
    assert sorted(p.name for p in (photo_tree / "train").iterdir()) == [f"n0000000{i}" for i in range(4)]
    assert {len(list(p.iterdir())) for p in (photo_tree / "train").iterdir()} == {16}
    with Image.open(train[0]) as image:
        assert image.format == "JPEG" and image.size == (320, 240) and image.mode == "RGB"
    again = write_photo_tree(tmp_path / "again", count=64, num_classes=4, size=(320, 240), seed=0,
                             with_val=True, val_count=16)
    assert [p.read_bytes() for p in sorted((again / "train").rglob("*.JPEG"))] == [p.read_bytes() for p in train]
    other = write_photo_tree(tmp_path / "other", count=4, num_classes=4, size=(320, 240), seed=1)
    assert sorted(other.rglob("*.JPEG"))[0].read_bytes() != train[0].read_bytes()
    assert not (other / "val").exists()
    assert not list(other.rglob(".*"))  # no temporary files left behind
