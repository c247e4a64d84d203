"""mt-shard: one-line errors with exit status 2 and nothing written; verify, info and resplit."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from shard_tools.cli import main
from shard_tools.files import sha256_file
from shard_tools.format import (
    LABELS_NAME,
    MANIFEST_NAME,
    TRAIN_CLASSES_NAME,
    TRAIN_LABELED,
    TRAIN_UNLABELED,
    VAL,
)
from shard_tools.manifest import read_manifest, shard_paths
from shard_tools.samples import write_photo_tree
from shard_tools.writer import sample_members, write_shard


def _tiny_tree(root: Path) -> Path:
    return write_photo_tree(root, count=6, num_classes=2, size=(40, 30), seed=1)


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    # A progress bar may have been drawn before the error: drop its frames, keep the error lines.
    frames = [part.strip() for line in captured.err.splitlines() for part in line.split("\r")]
    lines = [frame for frame in frames if frame and not re.match(r"^\w+:\s+\d+%\|", frame)]
    assert len(lines) == 1 and lines[0].startswith(f"mt-shard {argv[0]}: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_missing_source(tmp_path: Path, capsys):
    line = _error(capsys, ["pack", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert "no such folder or file list" in line and not (tmp_path / "out").exists()


def test_empty_class_folder(tmp_path: Path, capsys):
    tree = _tiny_tree(tmp_path / "t")
    (tree / "train" / "zebra").mkdir()
    line = _error(capsys, ["pack", str(tree), str(tmp_path / "out")])
    assert "zebra: empty class folder" in line and not (tmp_path / "out").exists()


def test_unknown_class_in_list(tmp_path: Path, capsys):
    tree = _tiny_tree(tmp_path / "t")
    (tree / "list.txt").write_text("train/n00000000/train_000000.JPEG n00000000\n"
                                   "train/n00000001/train_000001.JPEG zebra\n")
    (tree / "classes.txt").write_text("n00000000\nn00000001\n")
    line = _error(capsys, ["pack", str(tree / "list.txt"), str(tmp_path / "out"), "--classes", str(tree / "classes.txt")])
    assert "list.txt:2: unknown class 'zebra'" in line and not (tmp_path / "out").exists()
    (tree / "list.txt").write_text("just-a-path\n")
    assert "expected '<path> <class name>'" in _error(capsys, ["pack", str(tree / "list.txt"), str(tmp_path / "out")])


def test_unknown_class_or_image_in_labels_file(tmp_path: Path, capsys):
    tree = _tiny_tree(tmp_path / "t")
    labels = tmp_path / "labels.txt"
    labels.write_text("train-n00000000-train_000000 zebra\n")
    line = _error(capsys, ["pack", str(tree), str(tmp_path / "out"), "--labels", str(labels)])
    assert "unknown class 'zebra'" in line and not (tmp_path / "out").exists()
    labels.write_text("no-such-key n00000000\n")
    assert "not a training image" in _error(capsys, ["pack", str(tree), str(tmp_path / "out"), "--labels", str(labels)])
    assert not (tmp_path / "out").exists()


def test_bad_split_requests(tmp_path: Path, capsys):
    tree = write_photo_tree(tmp_path / "t", count=6, num_classes=2, size=(40, 30), with_val=True, val_count=2)
    out = str(tmp_path / "out")
    assert "fewer than --labels-per-class 4" in _error(capsys, ["pack", str(tree), out, "--labels-per-class", "4"])
    assert "drop --val-fraction" in _error(capsys, ["pack", str(tree), out, "--val-fraction", "0.2"])
    assert "not several" in _error(capsys, ["pack", str(tree), out, "--labels-per-class", "1", "--label-fraction", ".5"])
    assert "--quality 0" in _error(capsys, ["pack", str(tree), out, "--quality", "0"])
    assert not (tmp_path / "out").exists()


def test_class_with_only_unreadable_images(tmp_path: Path, capsys):
    tree = _tiny_tree(tmp_path / "t")
    for image in (tree / "train" / "n00000001").iterdir():
        image.write_bytes(b"garbage")
    line = _error(capsys, ["pack", str(tree), str(tmp_path / "out")])
    assert "class 'n00000001' has no readable training image" in line and not (tmp_path / "out").exists()


def test_out_holding_something_else(photo_shards: Path, tmp_path: Path, capsys):
    tree = _tiny_tree(tmp_path / "t")
    copy = tmp_path / "set"
    shutil.copytree(photo_shards, copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    assert "holds a different shard set" in _error(capsys, ["pack", str(tree), str(copy)])
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not empty" in _error(capsys, ["pack", str(tree), str(other)])
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_pack_info_verify_cli(tmp_path: Path, capsys):
    out = tmp_path / "digits"
    assert main(["pack", "digits", str(out), "--labels-per-class", "3", "--shard-size", "600", "--quiet"]) == 0
    assert "packed 1797 images (train-labeled 30, train-unlabeled 1228, val 539), skipped 0" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "classes:  10 (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)" in info
    assert "3 labeled images per class, seed 0" in info and "0:3 1:3" in info
    assert "train-unlabeled       1228       3" in info
    assert main(["verify", str(out), "--decode"]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")
    assert "no such shard set folder" in _error(capsys, ["info", str(tmp_path / "nothing-here")])


def test_verify_names_each_problem(photo_shards: Path, tmp_path: Path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(photo_shards, bad)
    manifest = read_manifest(bad)
    unlabeled = Path(shard_paths(bad, TRAIN_UNLABELED)[0])
    labeled = Path(shard_paths(bad, TRAIN_LABELED)[0])
    # An unlabeled shard rewritten to carry labels (and a repeated key), with a fresh index and hash.
    key = (bad / LABELS_NAME).read_text().split()[0]
    write_shard(bad, unlabeled.name, [sample_members("leaky", b"\xff\xd8\xff\xd9", 1, None),
                                       sample_members(key, b"\xff\xd8\xff\xd9", 0, None)])
    info = manifest.splits[TRAIN_UNLABELED]
    info.sha256[0] = sha256_file(unlabeled)
    (bad / MANIFEST_NAME).write_text(manifest.to_json())
    with open(labeled, "ab") as handle:  # damage a labeled shard
        handle.write(b"\0" * 512)
    (bad / Path(shard_paths(bad, VAL)[0]).with_suffix(".idx").name).write_text("v1.2 0\n")
    shutil.copy(labeled, bad / "train-labeled-000099.tar")
    assert main(["verify", str(bad), "--decode"]) == 1
    report = capsys.readouterr().out
    assert f"{labeled.name}: sha256 differs" in report
    assert f"{unlabeled.name}: unlabeled sample leaky carries label 1" in report
    assert f"key {key} repeats" in report
    assert f"{unlabeled.name}: holds 2 samples, the manifest says 16" in report
    assert "val-000000.idx: does not match" in report
    assert "train-labeled-000099.tar: a shard not in the manifest" in report
    assert "does not decode" in report
    assert f"{TRAIN_CLASSES_NAME}: lists" in report
    assert report.strip().endswith("problem(s)")


def test_resplit_copies_members_and_matches_a_fresh_pack(digits_shards: Path, tmp_path: Path, capsys):
    new = tmp_path / "resplit"
    assert main(["resplit", str(digits_shards), str(new), "--label-fraction", "0.1", "--quiet"]) == 0
    assert "re-split 1797 images" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    assert main(["pack", "digits", str(fresh), "--label-fraction", "0.1", "--shard-size", "256", "--quiet"]) == 0
    for split in (TRAIN_LABELED, TRAIN_UNLABELED, VAL):
        assert [Path(p).read_bytes() for p in shard_paths(new, split)] == \
               [Path(p).read_bytes() for p in shard_paths(fresh, split)]
    assert (new / LABELS_NAME).read_text() == (fresh / LABELS_NAME).read_text()
    manifest = read_manifest(new)
    # Training images per class after the 30% val hold-out: 125 127 124 128 127 127 127 125 122 126;
    # 10% of each, rounded half up: 13 13 12 13 13 13 13 13 12 13.
    assert manifest.label_split["labeled_per_class"] == [13, 13, 12, 13, 13, 13, 13, 13, 12, 13]
    assert manifest.split(TRAIN_LABELED).num_samples == 128
    assert main(["verify", str(new)]) == 0
    capsys.readouterr()
    assert "not empty" in _error(capsys, ["resplit", str(digits_shards), str(new), "--labels-per-class", "2"])
    labels = tmp_path / "few.txt"
    labels.write_text("".join((digits_shards / LABELS_NAME).read_text().splitlines(keepends=True)[:7]))
    again = tmp_path / "from-file"
    assert main(["resplit", str(digits_shards), str(again), "--labels", str(labels), "--quiet"]) == 0
    assert (again / LABELS_NAME).read_text() == labels.read_text()


@pytest.mark.parametrize("argv", [["verify"], ["pack", "digits"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_class_names_with_white_space_are_refused(tmp_path: Path, capsys):
    tree = _tiny_tree(tmp_path / "t")
    (tree / "train" / "n00000001").rename(tree / "train" / "great white")
    line = _error(capsys, ["pack", str(tree), str(tmp_path / "out")])
    assert "class name 'great white' holds white space" in line and not (tmp_path / "out").exists()


def test_out_inside_source_is_refused(tmp_path: Path, capsys):
    tree = _tiny_tree(tmp_path / "t")
    assert "is inside SRC" in _error(capsys, ["pack", str(tree), str(tree / "shards")])
    assert not (tree / "shards").exists()
