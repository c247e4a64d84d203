"""Hostile or careless inputs to `mt-shard pack`: output locations the system refuses, decompression
bombs, FIFOs and devices, duplicate list lines, a user's own files in OUT."""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

import shard_tools.pack as pack_module
import shard_tools.writer as writer_module
from shard_tools.cli import main
from shard_tools.files import sha256_file
from shard_tools.format import MANIFEST_NAME, TRAIN_LABELED
from shard_tools.imaging import DEFAULT_MAX_PIXELS
from shard_tools.manifest import read_manifest
from shard_tools.pack import pack
from shard_tools.pack_resume import STATE_NAME
from shard_tools.samples import write_photo_tree
from shard_tools.verify import verify
from shard_tools.writer import sample_members, write_shard

BOMB = (20000, 20000)


def _tiny_tree(root: Path, count: int = 6) -> Path:
    return write_photo_tree(root, count=count, num_classes=2, size=(40, 30), seed=1)


def _png_claiming(size: tuple[int, int]) -> bytes:
    """A 1x1 PNG whose header (IHDR, with a valid CRC) claims `size`: a few bytes, a bomb to decode."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", *size)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg_claiming(size: tuple[int, int]) -> bytes:
    """An 8x8 JPEG whose frame header (SOF0) claims `size`."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", size[1], size[0])
    return bytes(data)


@pytest.fixture
def decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image PIL decodes in this process (pack with workers=1 decodes here)."""
    sizes: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load

    def load(self):
        sizes.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


def test_pack_output_location_errors(tmp_path: Path, read_only_dir: Path, cli_error):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {
        str(a_file / "out"): f"{a_file} is a file, not a folder, so OUT cannot be made there",
        "/proc/mt-shard-test/out": "/proc/mt-shard-test/out: cannot write there in /proc",
        str(read_only_dir / "out"): f"{read_only_dir / 'out'}: cannot write there",
        str(a_file): f"{a_file}: exists and is not a folder",
    }
    for out, expected in cases.items():
        assert expected in cli_error(["pack", "digits", out, "--quiet"])
    assert a_file.read_text() == "x" and list(read_only_dir.iterdir()) == []
    assert not Path("/proc/mt-shard-test").exists()


def test_pack_no_space_left_leaves_nothing(tmp_path: Path, mount_tmpfs, monkeypatch, cli_error):
    small = tmp_path / "small"
    if not mount_tmpfs(small, "size=256k"):
        def full(out_dir, name, samples):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(out_dir) / f".{name}.partial"))

        monkeypatch.setattr(pack_module, "write_shard", full)
    out = small / "sets" / "digits"
    line = cli_error(["pack", "digits", str(out), "--labels-per-class", "5", "--workers", "1", "--quiet"])
    assert "No space left on device" in line and str(out) in line and "nothing was kept" in line
    assert list(small.iterdir()) == []  # no OUT, no half-written shard, no state file


def test_pack_os_error_after_some_shards_keeps_them_to_resume(tmp_path: Path, monkeypatch, cli_error):
    tree = _tiny_tree(tmp_path / "t", count=12)
    out = tmp_path / "out"
    real = writer_module.write_shard
    calls = {"n": 0}

    def full_on_third(out_dir, name, samples, **hooks):
        calls["n"] += 1
        if calls["n"] == 3:
            Path(out_dir, f".{name}.partial").write_bytes(b"half a tar")  # what the failed write leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(out_dir) / f".{name}.partial"))
        return real(out_dir, name, samples, **hooks)

    monkeypatch.setattr(pack_module, "write_shard", full_on_third)
    argv = ["pack", str(tree), str(out), "--label-fraction", "1", "--val-fraction", "0", "--shard-size", "2",
            "--workers", "1", "--quiet"]
    line = cli_error(argv)
    assert "No space left on device" in line and "2 finished shard(s) kept" in line and "to resume" in line
    assert not list(out.glob(".*.partial")) and not (out / MANIFEST_NAME).exists() and (out / STATE_NAME).exists()
    monkeypatch.setattr(pack_module, "write_shard", real)
    summary = pack(tree, out, label_fraction=1.0, val_fraction=0, shard_size=2, workers=1, progress=False)
    assert summary.shards_kept == 2 and summary.shards_written == 4 and verify(out) == []


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_bomb_is_skipped_from_its_header_never_decoded(tmp_path: Path, kind: str, decoded_sizes):
    tree = _tiny_tree(tmp_path / "t")
    bomb = tree / "train" / "n00000000" / f"bomb.{kind}"
    bomb.write_bytes(_png_claiming(BOMB) if kind == "png" else _jpeg_claiming(BOMB))
    assert bomb.stat().st_size < 1000
    decoded_sizes.clear()
    summary = pack(tree, tmp_path / "out", label_fraction=1.0, val_fraction=0, workers=1, progress=False)
    reasons = {entry["path"]: entry["reason"] for entry in read_manifest(tmp_path / "out").skipped}
    assert reasons == {f"train/n00000000/bomb.{kind}": f"too large: 20000x20000 pixels, over the cap of "
                                                        f"{DEFAULT_MAX_PIXELS} (see --max-pixels)"}
    assert summary.skipped == 1 and summary.images == 6
    # Every decode was a real 40x30 image (JPEGs at 1/8 scale while checking), none the bomb.
    assert len(decoded_sizes) >= 6 and max(w * h for w, h in decoded_sizes) <= 40 * 30


def test_verify_decode_uses_the_same_cap_from_the_header(photo_shards: Path, tmp_path: Path, decoded_sizes, capsys):
    out = tmp_path / "set"
    tree = _tiny_tree(tmp_path / "t")
    pack(tree, out, label_fraction=1.0, val_fraction=0, workers=1, progress=False, max_pixels=1300)
    manifest = read_manifest(out)
    assert manifest.image["max_pixels"] == 1300 and manifest.pack_args["max_pixels"] == 1300
    assert verify(out, decode=True) == []
    # The set's own cap governs: lowered below 40x30, every image is refused from its header.
    data = json.loads((out / MANIFEST_NAME).read_text())
    data["image"]["max_pixels"] = 1000
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    problems = verify(out, decode=True)
    assert len(problems) == 6 and all("too large: 40x30 pixels, over the cap of 1000" in p for p in problems)
    data["image"]["max_pixels"] = 1300
    # A shard holding a bomb image (the manifest updated to match, as a hostile set would be).
    name = manifest.split(TRAIN_LABELED).shards[0]
    write_shard(out, name, [sample_members("bomb", _jpeg_claiming(BOMB), 0, None)])
    data["splits"][TRAIN_LABELED].update(sha256=[sha256_file(out / name)], bytes=[(out / name).stat().st_size])
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    decoded_sizes.clear()
    assert main(["verify", str(out), "--decode"]) == 1
    assert f"{name}: image bomb too large: 20000x20000 pixels, over the cap of 1300" in capsys.readouterr().out
    assert BOMB not in decoded_sizes
    assert "--max-pixels 0: must be at least 1" in _pack_error(["pack", "digits", str(tmp_path / "o"), "--max-pixels", "0"])


def _pack_error(argv: list[str]) -> str:
    import contextlib

    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        assert main(argv) == 2
    return buffer.getvalue()


@pytest.mark.timeout(60)
def test_fifo_and_device_in_a_source_are_skipped(tmp_path: Path):
    tree = _tiny_tree(tmp_path / "t")
    os.mkfifo(tree / "train" / "n00000000" / "pipe.jpg")
    (tree / "train" / "n00000001" / "zero.jpg").symlink_to("/dev/zero")
    summary = pack(tree, tmp_path / "out", label_fraction=1.0, val_fraction=0, workers=1, progress=False)
    reasons = {entry["path"]: entry["reason"] for entry in read_manifest(tmp_path / "out").skipped}
    assert reasons == {"train/n00000000/pipe.jpg": "not a regular file (a FIFO, device or socket)",
                       "train/n00000001/zero.jpg": "not a regular file (a FIFO, device or socket)"}
    assert summary.skipped == 2 and summary.images == 6


def _list(tree: Path, name: str, lines: list[str]) -> Path:
    (tree / name).write_text("".join(line + "\n" for line in lines))
    return tree / name


def test_duplicate_list_lines_are_refused_with_line_numbers(tmp_path: Path, cli_error):
    tree = _tiny_tree(tmp_path / "t", count=8)
    images = [f"{p.relative_to(tree)} {p.parent.name}" for p in sorted((tree / "train").rglob("*.JPEG"))]
    out = str(tmp_path / "out")
    twice = _list(tree, "twice.txt", ["# my images", images[0], *images[1:4], images[0]])
    assert "twice.txt:6: the same image as " in cli_error(["pack", str(twice), out])
    assert f"{twice}:2 (" in cli_error(["pack", str(twice), out])
    first_path, first_class = images[0].split()
    other_class = "n00000001" if first_class == "n00000000" else "n00000000"
    two_classes = _list(tree, "two-classes.txt", [*images[:4], f"./{first_path} {other_class}"])
    line = cli_error(["pack", str(two_classes), out])
    assert "two-classes.txt:5: the same image as " in line and "two-classes.txt:1" in line
    train = _list(tree, "train.txt", images[:6])
    val = _list(tree, "val.txt", [images[6], images[2]])  # a training image also listed for val
    line = cli_error(["pack", str(train), out, "--val-list", str(val)])
    assert f"{val}:2: the same image as {train}:3" in line and "in one list" in line
    assert not Path(out).exists()


def test_lower_pack_items(tmp_path: Path, cli_error, capsys):
    tree = _tiny_tree(tmp_path / "t")
    out = tmp_path / "out"
    assert "--seed -1: must be a whole number, 0 or more" in cli_error(["pack", str(tree), str(out), "--seed", "-1"])
    # A user's own *.partial files in OUT are theirs: refused, never deleted.
    out.mkdir()
    for name in ("draft.partial", ".draft.partial"):
        (out / name).write_text("mine")
        assert "exists and is not empty" in cli_error(["pack", str(tree), str(out), "--quiet"])
        assert (out / name).read_text() == "mine"
        (out / name).unlink()
    # Our own leftover temporaries are recognised and cleared.
    (out / ".val-000000.tar.partial").write_bytes(b"half")
    assert main(["pack", str(tree), str(out), "--labels-per-class", "1", "--quiet"]) == 0
    assert not (out / ".val-000000.tar.partial").exists() and verify(out) == []
    capsys.readouterr()
    # A finished set with a shard deleted or damaged is not "nothing to do".
    argv = ["pack", str(tree), str(out), "--labels-per-class", "1", "--quiet"]
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    shard = out / read_manifest(out).split(TRAIN_LABELED).shards[0]
    data = shard.read_bytes()
    shard.unlink()
    line = cli_error(argv)
    assert f"already packed with these options, but {shard.name} is missing" in line and "delete" in line
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert f"{shard.name}'s sha256 differs from manifest.json" in cli_error(argv)


def test_prose_list_file_and_unreadable_class_folder(tmp_path: Path, monkeypatch, cli_error):
    tree = _tiny_tree(tmp_path / "t")
    prose = _list(tree, "README.txt", ["These are the photos from our trip", "to the coast last summer"])
    line = cli_error(["pack", str(prose), str(tmp_path / "out")])
    assert "README.txt: none of its 2 lines names an existing file" in line and "'<path> <class name>'" in line
    locked = tree / "train" / "n00000001"
    if os.geteuid() == 0:  # root reads any folder: make the listing fail as it would for a user
        real = os.scandir

        def scandir(path="."):
            if Path(path) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    else:
        locked.chmod(0)
    try:
        line = cli_error(["pack", str(tree), str(tmp_path / "out")])
    finally:
        locked.chmod(0o755)
    assert f"{locked}: cannot read this folder (Permission denied)" in line and "empty" not in line
    assert not (tmp_path / "out").exists()
