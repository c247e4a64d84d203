"""Packing: counts, keys, determinism, image settings, shard limits, bad files and resume."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import shard_tools.pack as pack_module
from shard_tools.format import (
    LABELS_NAME,
    MANIFEST_NAME,
    TRAIN_CLASSES_NAME,
    TRAIN_LABELED,
    TRAIN_UNLABELED,
    VAL,
)
from shard_tools.manifest import read_manifest, shard_paths
from shard_tools.pack import pack
from shard_tools.pack_resume import STATE_NAME
from shard_tools.samples import write_photo_tree
from shard_tools.sources import key_for
from shard_tools.verify import verify

# scikit-learn's digits per class: 178, 182, 177, 183, 181, 182, 181, 179, 174, 180; 30% held out for
# val, rounded half up per class: 53+55+53+55+54+55+54+54+52+54 = 539.
DIGITS_VAL = 539


def _members(path: str) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            key, _, ext = member.name.partition(".")
            out.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return out


def _set_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_digits_counts_and_split(digits_shards: Path):
    manifest = read_manifest(digits_shards)
    assert manifest.classes == [str(d) for d in range(10)]
    assert manifest.split(TRAIN_LABELED).counts == [50]
    assert manifest.split(TRAIN_UNLABELED).counts == [256, 256, 256, 256, 184]
    assert manifest.split(VAL).num_samples == DIGITS_VAL
    assert manifest.split(VAL).counts == [256, 256, 27]
    assert manifest.label_split == {"method": "labels_per_class", "labels_per_class": 5, "seed": 0,
                                    "labeled_per_class": [5] * 10}
    assert manifest.val_split == {"method": "fraction", "fraction": 0.3, "seed": 0}
    labels = (digits_shards / LABELS_NAME).read_text().splitlines()
    assert len(labels) == 50 and labels == sorted(labels)
    assert len((digits_shards / TRAIN_CLASSES_NAME).read_text().splitlines()) == 1797 - DIGITS_VAL
    assert verify(digits_shards) == []


def test_keys_unique_dot_free_and_stable():
    assert key_for("train/n01/img_1.JPEG") == "train-n01-img_1"
    assert key_for("a b/c.d.e.png") == "a-b-c-d-e"
    long_key = key_for("x/" + "y" * 200 + ".jpg")
    assert len(long_key) <= 90 and "." not in long_key and long_key != key_for("x/" + "y" * 199 + ".jpg")


def test_same_seed_same_bytes_any_worker_count(photo_tree: Path, photo_shards: Path, tmp_path: Path):
    again = pack(photo_tree, tmp_path / "two", label_fraction=0.25, seed=0, shard_size=16, workers=2, progress=False)
    assert again.images == 80 and not again.already_complete
    assert _set_bytes(tmp_path / "two") == _set_bytes(photo_shards)
    other = tmp_path / "seed1"
    pack(photo_tree, other, label_fraction=0.25, seed=1, shard_size=16, workers=1, progress=False)
    assert (other / LABELS_NAME).read_text() != (photo_shards / LABELS_NAME).read_text()
    # Packing into a finished set with the same options is a no-op.
    assert pack(photo_tree, other, label_fraction=0.25, seed=1, shard_size=16, progress=False).already_complete


def test_max_side_resizes_and_small_images_keep_their_bytes(photo_tree: Path, tmp_path: Path):
    small = tmp_path / "small"
    pack(photo_tree, small, max_side=160, quality=80, shard_size=100, workers=1, progress=False)
    kept = tmp_path / "kept"
    pack(photo_tree, kept, max_side=320, shard_size=100, workers=1, progress=False)
    assert read_manifest(small).image == {"max_side": 160, "quality": 80}
    for split in (TRAIN_LABELED, VAL):
        for path in shard_paths(small, split):
            for parts in _members(path).values():
                assert Image.open(io.BytesIO(parts["jpg"])).size == (160, 120)
                assert json.loads(parts["json"])["size"] == [320, 240]
        for path in shard_paths(kept, split):
            for parts in _members(path).values():
                assert parts["jpg"] == (photo_tree / json.loads(parts["json"])["source"]).read_bytes()


def test_shard_bytes_bounds_shards(photo_tree: Path, tmp_path: Path):
    out = tmp_path / "bytes"
    pack(photo_tree, out, shard_bytes=150_000, workers=1, progress=False)
    paths = shard_paths(out, TRAIN_LABELED)
    assert len(paths) > 1
    # Members stay under the bound; the tar adds its end-of-archive record padding (at most 10 KiB).
    assert all(Path(p).stat().st_size <= 150_000 + 10240 for p in paths)
    assert read_manifest(out).split(TRAIN_LABELED).num_samples == 64


def _bad_tree(root: Path) -> Path:
    write_photo_tree(root, count=12, num_classes=3, size=(64, 48), seed=5, with_val=True, val_count=3)
    folder = root / "train" / "n00000000"
    good = (folder / "train_000000.JPEG").read_bytes()
    (folder / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "gone.JPEG").symlink_to(root / "does-not-exist.JPEG")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "red.png")
    Image.new("CMYK", (40, 30), (0, 50, 90, 0)).save(folder / "cmyk.jpg")
    Image.new("L", (40, 30), 128).save(root / "train" / "n00000001" / "gray.jpg")
    (root / "train" / "stray.txt").write_text("outside any class folder")
    return root


def test_bad_files_are_skipped_counted_and_listed(tmp_path: Path):
    root = _bad_tree(tmp_path / "bad")
    summary = pack(root, tmp_path / "out", label_fraction=1.0, workers=2, progress=False)
    manifest = read_manifest(tmp_path / "out")
    reasons = {entry["path"]: entry["reason"] for entry in manifest.skipped}
    assert set(reasons) == {
        "train/n00000000/truncated.JPEG", "train/n00000000/notes.txt", "train/n00000000/empty.JPEG",
        "train/n00000000/gone.JPEG", "train/stray.txt",
    }
    assert reasons["train/n00000000/notes.txt"] == "not an image"
    assert reasons["train/n00000000/truncated.JPEG"].startswith("corrupt or truncated")
    assert reasons["train/n00000000/gone.JPEG"].startswith("unreadable")
    assert summary.skipped == 5
    # 12 generated + png + cmyk + gray; fully labeled, so no unlabeled shards at all.
    assert manifest.split(TRAIN_LABELED).num_samples == 15 and manifest.split(TRAIN_UNLABELED).shards == []
    assert manifest.label_split["labeled_per_class"] == [6, 5, 4]
    assert verify(tmp_path / "out", decode=True) == []
    by_source = {}
    for parts in _members(shard_paths(tmp_path / "out", TRAIN_LABELED)[0]).values():
        by_source[json.loads(parts["json"])["source"]] = parts["jpg"]
    for name in ("red.png", "cmyk.jpg"):
        image = Image.open(io.BytesIO(by_source[f"train/n00000000/{name}"]))
        assert image.format == "JPEG" and image.mode == "RGB"
    assert by_source["train/n00000001/gray.jpg"] == (root / "train/n00000001/gray.jpg").read_bytes()


def test_file_list_source_with_val_list(tmp_path: Path):
    tree = write_photo_tree(tmp_path / "t", count=8, num_classes=2, size=(48, 32), with_val=True, val_count=2)
    lines = ["# images", *(f"{p.relative_to(tree)} {p.parent.name}" for p in sorted((tree / "train").rglob("*.JPEG")))]
    (tree / "train.txt").write_text("\n".join(lines) + "\n")
    (tree / "val.txt").write_text("".join(f"{p.relative_to(tree)} {p.parent.name}\n"
                                          for p in sorted((tree / "val").rglob("*.JPEG"))))
    out = tmp_path / "out"
    pack(tree / "train.txt", out, labels_per_class=1, val_list=tree / "val.txt", workers=1, progress=False)
    manifest = read_manifest(out)
    assert [manifest.split(s).num_samples for s in (TRAIN_LABELED, TRAIN_UNLABELED, VAL)] == [2, 6, 2]
    assert manifest.val_split == {"method": "list"}
    assert verify(out) == []


def test_labels_file_reuses_a_split(digits_shards: Path, tmp_path: Path):
    out = tmp_path / "again"
    pack("digits", out, labels_file=digits_shards / LABELS_NAME, shard_size=256, workers=1, progress=False)
    assert (out / LABELS_NAME).read_text() == (digits_shards / LABELS_NAME).read_text()
    for split in (TRAIN_LABELED, TRAIN_UNLABELED, VAL):
        assert [Path(p).read_bytes() for p in shard_paths(out, split)] == \
               [Path(p).read_bytes() for p in shard_paths(digits_shards, split)]


def test_resume_after_interrupted_pack(photo_tree: Path, photo_shards: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "resumed"
    calls = {"n": 0}
    real = pack_module._pack_shard

    def dies_on_third(task):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what a kill between two shards leaves behind
        return real(task)

    monkeypatch.setattr(pack_module, "_pack_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        pack(photo_tree, out, label_fraction=0.25, seed=0, shard_size=16, workers=1, progress=False)
    monkeypatch.setattr(pack_module, "_pack_shard", real)
    assert not (out / MANIFEST_NAME).exists() and (out / STATE_NAME).exists()
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert len(finished) == 2
    # A half-written file and a journal line cut short by the kill, and one finished shard damaged afterwards.
    (out / ".val-000000.tar.partial").write_bytes(b"half a tar")
    with open(out / STATE_NAME, "ab") as journal:
        journal.write(b'\n{"shard": "val-000000.tar", "plan": "')
    with open(out / finished[1], "ab") as handle:
        handle.write(b"\0")
    kept_stat = (out / finished[0]).stat()

    summary = pack(photo_tree, out, label_fraction=0.25, seed=0, shard_size=16, workers=1, progress=False)
    assert summary.shards_kept == 1 and summary.shards_written == 4
    assert (out / finished[0]).stat().st_mtime_ns == kept_stat.st_mtime_ns
    assert _set_bytes(out) == _set_bytes(photo_shards)
    assert not (out / STATE_NAME).exists()


def test_progress_bar_and_summary_line(capsys, tmp_path: Path):
    tree = write_photo_tree(tmp_path / "t", count=6, num_classes=2, size=(40, 30))
    summary = pack(tree, tmp_path / "out", labels_per_class=1, val_fraction=0, workers=1, progress=True)
    assert "pack" in capsys.readouterr().err  # tqdm writes to stderr
    line = summary.line()
    assert "packed 6 images (train-labeled 2, train-unlabeled 4, val 0), skipped 0" in line and "img/s" in line


def test_copied_set_is_still_a_valid_set(photo_shards: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(photo_shards, copy)
    assert verify(copy) == []


def test_resume_after_the_input_changed_drops_stale_shards(tmp_path: Path, monkeypatch):
    tree = write_photo_tree(tmp_path / "t", count=12, num_classes=2, size=(40, 30), seed=2)
    out = tmp_path / "out"
    real = pack_module._pack_shard
    calls = {"n": 0}

    def dies_on_fourth(task):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(pack_module, "_pack_shard", dies_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        pack(tree, out, label_fraction=1.0, val_fraction=0, shard_size=2, workers=1, progress=False)
    monkeypatch.setattr(pack_module, "_pack_shard", real)
    assert len(list(out.glob("*.tar"))) == 3
    for image in sorted((tree / "train" / "n00000001").iterdir())[:4]:
        image.unlink()  # 12 -> 8 images: 4 shards instead of 6, and different contents
    summary = pack(tree, out, label_fraction=1.0, val_fraction=0, shard_size=2, workers=1, progress=False)
    assert summary.counts[TRAIN_LABELED] == 8
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-labeled-00000{i}.tar" for i in range(4)]
    assert verify(out) == []


# `mt-shard pack` with each worker holding after its first shard: it reports the shard on the pipe
# (fd in argv[1]) once the shard has its final name, then waits to be killed. Every process of the
# pack holds the pipe's write end, so the pipe reads empty once the pack and all its workers are gone.
PACK_THEN_HOLD = """
import os, signal, sys
import shard_tools.pack
from shard_tools.cli import main

report = int(sys.argv[1])
real = shard_tools.pack._pack_shard

def report_then_hold(task):
    result = real(task)
    os.write(report, task.name.encode() + b"\\n")
    signal.pause()

shard_tools.pack._pack_shard = report_then_hold
sys.exit(main(sys.argv[2:]))
"""


def test_resume_after_sigkill(photo_tree: Path, photo_shards: Path, tmp_path: Path):
    """A real kill -9 of `mt-shard pack` once each worker has finished a shard (workers die with it):
    every finished shard on disk is in the resume journal, so the rerun keeps all of them."""
    out = tmp_path / "killed"
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-c", PACK_THEN_HOLD, str(write_end), "pack", str(photo_tree), str(out),
            "--label-fraction", "0.25", "--seed", "0", "--shard-size", "16", "--workers", "2", "--quiet"]
    process = subprocess.Popen(argv, pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=dict(os.environ, PYTHONPATH=str(Path(pack_module.__file__).parents[1])))
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reports:
        finished = [reports.readline().strip().decode() for _ in range(2)]  # one shard from each worker
        assert all(finished), process.communicate()[1]
        process.kill()
        assert reports.read() == b""  # end of file: the pack and both its workers are gone
    process.wait()
    assert not (out / MANIFEST_NAME).exists()
    on_disk = sorted(p.name for p in out.glob("*.tar"))
    assert on_disk == sorted(finished)
    # 16 labeled, 48 unlabeled and 16 val images in shards of 16: 1 + 3 + 1 shards, 2 of them finished.
    summary = pack(photo_tree, out, label_fraction=0.25, seed=0, shard_size=16, workers=2, progress=False)
    assert (summary.shards_kept, summary.shards_written) == (2, 3)
    assert _set_bytes(out) == _set_bytes(photo_shards)
