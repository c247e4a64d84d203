"""The reader checks what it reads against the index: each member's tar header (inside the span it
reads anyway) must name the member the index names, with its size; offsets and sizes lie inside
the shard. A mismatch is one PipelineError line naming the shard and the member."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.augment import AUGMENT_PRESETS
from pipelines.errors import PipelineError
from pipelines.reading import draws, open_set
from pipelines.rendering import render_views
from shard_tools.format import TRAIN_LABELED, index_name


def _rewrite_index(shard: Path, edit) -> list[list[str]]:
    """Apply `edit(rows)` to the fields of each sample line of `shard`'s index; returns the new rows."""
    index = Path(index_name(str(shard)))
    header, *lines = index.read_text().splitlines()
    rows = [line.split() for line in lines]
    edit(rows)
    index.write_text("\n".join([header, *(" ".join(row) for row in rows)]) + "\n")
    return rows


def _first_labeled_shard(set_dir: Path) -> Path:
    _, splits = open_set(str(set_dir))
    return Path(splits[TRAIN_LABELED].shards[0])


def _read_all(set_dir: Path) -> list:
    _, splits = open_set(str(set_dir))
    split = splits[TRAIN_LABELED]
    return list(draws(split, range(split.total), (0,), 0, cycle=False))


@pytest.fixture
def set_copy(digits_shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "set"
    shutil.copytree(digits_shards, copy)
    return copy


def _jpg_fields(row: list[str]) -> int:
    return next(i for i in range(0, len(row), 4) if row[i] == "jpg")


def test_swapped_image_offsets_are_refused_naming_shard_and_member(set_copy: Path) -> None:
    shard = _first_labeled_shard(set_copy)
    clean = _read_all(set_copy)

    def swap(rows: list[list[str]]) -> None:
        a, b = _jpg_fields(rows[0]), _jpg_fields(rows[1])
        rows[0][a + 1:a + 3], rows[1][b + 1:b + 3] = rows[1][b + 1:b + 3], rows[0][a + 1:a + 3]

    rows = _rewrite_index(shard, swap)
    name = rows[0][_jpg_fields(rows[0]) + 3]
    with pytest.raises(PipelineError) as refused:
        _read_all(set_copy)
    message = str(refused.value)
    assert message.startswith(f"{shard}: the tar header before member {name} (as its index places it) does not "
                              f"name {name} with ")
    assert "\n" not in message and "re-pack the set" in message
    assert len(clean) == 50  # the untouched set reads every labeled sample


def test_a_duplicated_offset_and_a_zero_size_are_refused(set_copy: Path) -> None:
    shard = _first_labeled_shard(set_copy)
    index = Path(index_name(str(shard)))
    original = index.read_text()

    def duplicate(rows: list[list[str]]) -> None:
        a, b = _jpg_fields(rows[0]), _jpg_fields(rows[1])
        rows[1][b + 1:b + 3] = rows[0][a + 1:a + 3]

    rows = _rewrite_index(shard, duplicate)
    with pytest.raises(PipelineError, match=f"member {rows[1][_jpg_fields(rows[1]) + 3]} "):
        _read_all(set_copy)
    index.write_text(original)

    def zero(rows: list[list[str]]) -> None:
        rows[1][_jpg_fields(rows[1]) + 2] = "0"

    _rewrite_index(shard, zero)
    with pytest.raises(PipelineError, match="does not name .* with 0 bytes"):
        _read_all(set_copy)


@pytest.mark.parametrize("offset", [str(2**63 + 512), str(2**70), "1", "513"])
def test_offsets_outside_the_shard_or_off_a_block_are_refused(set_copy: Path, offset: str) -> None:
    shard = _first_labeled_shard(set_copy)
    rows = _rewrite_index(shard, lambda rows: rows[2].__setitem__(_jpg_fields(rows[2]) + 1, offset))
    name = rows[2][_jpg_fields(rows[2]) + 3]
    with pytest.raises(PipelineError) as refused:
        _read_all(set_copy)
    assert str(refused.value).startswith(f"{shard}: its index puts member {name} at bytes {offset}..")
    assert "-byte tar; check the set with `mt-shard verify`" in str(refused.value)


def test_an_empty_image_is_a_skip_not_a_traceback() -> None:
    spec = AUGMENT_PRESETS["digits-eval"]
    out = np.zeros((3, *spec.output_size), np.uint8)
    assert render_views(b"", (spec,), np.random.default_rng(0), (out,)) is False


def _png_claiming(size: tuple[int, int]) -> bytes:
    """A 1x1 PNG whose header (IHDR, with a valid CRC) claims `size`: a few bytes, a bomb to decode."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", *size)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_images_over_the_pixel_cap_are_skipped_from_their_header(set_copy: Path, monkeypatch) -> None:
    import tarfile

    import cv2

    import pipelines.rendering as rendering
    from pipelines.rendering import Draws

    shard = _first_labeled_shard(set_copy)
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    bomb = _png_claiming((20000, 20000))
    with open(shard, "r+b") as handle:  # the same length: the tar and its index stay valid
        handle.seek(member.offset_data)
        handle.write(bomb + b"\0" * (member.size - len(bomb)))
    decoded: list[int] = []
    real = cv2.imdecode

    def imdecode(buffer, flags):
        decoded.append(len(buffer))
        return real(buffer, flags)

    monkeypatch.setattr(rendering.cv2, "imdecode", imdecode)
    _, splits = open_set(str(set_copy))
    split = splits[TRAIN_LABELED]
    spec = AUGMENT_PRESETS["digits-train"]
    draws_ = Draws(split, range(split.total), (0,), 0)  # the default cap: PIL's, 89478485 pixels
    outs = (np.zeros((3, *spec.output_size), np.uint8),)
    keys = [draws_.render((spec,), outs)[0] for _ in range(split.total - 1)]
    assert draws_.skipped == 1 and member.name.split(".")[0] not in keys and len(set(keys)) == split.total - 1
    assert len(decoded) == split.total - 1  # the bomb was never handed to the decoder
    small = Draws(split, range(split.total), (0,), 0, max_pixels=63)  # digits are 8x8 = 64 pixels
    with pytest.raises(PipelineError, match="none of the 50 train-labeled images this reader holds decodes"):
        small.render((spec,), outs)


def test_dali_readers_skip_a_jpeg_over_the_pixel_cap_before_decoding(set_copy: Path) -> None:
    import struct
    import tarfile

    from pipelines.dali_feed import EncodedDraws

    shard = _first_labeled_shard(set_copy)
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        data = bytearray(tar.extractfile(member).read())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 20000, 20000)  # the frame header claims 20000x20000
    with open(shard, "r+b") as handle:
        handle.seek(member.offset_data)
        handle.write(bytes(data))
    _, splits = open_set(str(set_copy))
    split, key = splits[TRAIN_LABELED], member.name.split(".")[0]
    # what DALI is fed: every image but the one over the cap (PIL's 89478485 pixels by default),
    # skipped and counted as the torch backend skips it, before any decoder sees it
    capped = EncodedDraws(split, range(split.total), (0,), 0)
    fed = [capped.take()[0] for _ in range(split.total - 1)]
    assert capped.skipped == 1 and key not in fed and len(set(fed)) == split.total - 1
    roomy = EncodedDraws(split, range(split.total), (0,), 0, max_pixels=400_000_000)
    fed = [roomy.take()[0] for _ in range(split.total)]
    assert roomy.skipped == 0 and key in fed
