"""Pack checks a source file's size (stat) and its header before it reads the file whole: a huge
sparse file, a large file that is not an image, and a header over the pixel cap are skipped with
their reason, without being read."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

from PIL import Image

import shard_tools.imaging as imaging
from shard_tools.pack import pack
from shard_tools.samples import write_photo_tree


def _png_claiming(size: tuple[int, int], padding: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", *size)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data) + b"\0" * padding


def test_pack_judges_a_file_by_stat_and_header_before_reading_it(tmp_path: Path) -> None:
    tree = write_photo_tree(tmp_path / "tree", count=6, num_classes=2, size=(40, 30), seed=1)
    folder = next(path.parent for path in sorted(tree.rglob("*")) if path.is_file())  # a class folder
    big = folder / "big.jpg"
    with open(big, "wb") as handle:  # 2 GB, sparse: costs no disk, and must cost no memory either
        handle.truncate(2 << 30)
    (folder / "noise.jpg").write_bytes(os.urandom(200_000))
    (folder / "bomb.jpg").write_bytes(_png_claiming((20000, 20000), 100_000))
    out = tmp_path / "out"
    tracemalloc.start()
    try:
        summary = pack(tree, out, val_fraction=0, workers=1, progress=False)  # one process: traced here
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    from shard_tools.manifest import read_manifest

    reasons = {Path(entry["path"]).name: entry["reason"] for entry in read_manifest(out).skipped}
    limit = imaging.max_file_bytes(imaging.DEFAULT_MAX_PIXELS)
    assert reasons == {
        "big.jpg": f"too large: {2 << 30} bytes, more than an image of at most 89478485 pixels holds "
                   "(see --max-pixels)",
        "noise.jpg": "not an image",
        "bomb.jpg": "too large: 20000x20000 pixels, over the cap of 89478485 (see --max-pixels)",
    }
    assert summary.images == 6 and limit < 2 << 30
    assert peak < 64 << 20  # reading the 2 GB file (or the 400 million pixels) would have cost far more
