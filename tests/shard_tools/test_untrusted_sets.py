"""Shard sets from someone else: hostile names, damaged set files and shards, and resplit's safety."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

import shard_tools.resplit as resplit_module
from shard_tools.cli import main
from shard_tools.files import partial_path
from shard_tools.format import (
    LABELS_NAME,
    MANIFEST_NAME,
    TRAIN_CLASSES_NAME,
    TRAIN_LABELED,
    TRAIN_UNLABELED,
    VAL,
    ShardFormatError,
    index_name,
    parse_index,
)
from shard_tools.manifest import read_manifest
from shard_tools.resplit import MARKER_NAME


def _rename_val_shard(folder: Path, name: str) -> None:
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["splits"][VAL]["shards"][0] = name
    (folder / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize("hostile", ["../../.bashrc", "../val-000000.tar", "ABSOLUTE", "val-000000.tar/../x.tar",
                                     "sub/val-000000.tar", "val-000000.tar\x00", "..",
                                     "val-000000.tar\nset: OK"])
def test_hostile_shard_names_are_refused_by_verify_info_resplit(set_copy: Path, tmp_path: Path, hostile: str,
                                                               cli_error, snapshot):
    work = tmp_path / "work"
    new_out = work / "a" / "new"
    (work / "a").mkdir(parents=True)
    # What the old code touched: NEWOUT/../../.bashrc (overwritten) and a real shard beside the set.
    sentinel = work / ".bashrc"
    sentinel.write_text("mine\n")
    shutil.copy(set_copy / "val-000000.tar", tmp_path / "val-000000.tar")
    if hostile == "ABSOLUTE":
        hostile = str(tmp_path / "val-000000.tar")
    _rename_val_shard(set_copy, hostile)
    before = snapshot(tmp_path)
    for argv in (["verify", str(set_copy)], ["verify", str(set_copy), "--decode"], ["info", str(set_copy)],
                 ["resplit", str(set_copy), str(new_out), "--labels-per-class", "2", "--quiet"]):
        line = cli_error(argv)
        assert "shard name" in line and "is not a plain shard file name" in line and "manifest.json" in line, line
    assert snapshot(tmp_path) == before  # nothing written, inside the set or out of it
    assert sentinel.read_text() == "mine\n" and not new_out.exists()
    with pytest.raises(ShardFormatError, match="not a plain shard file name"):
        read_manifest(set_copy)  # the one place every reader (the loaders too) goes through


def test_manifest_field_damage_is_listed_by_verify_and_one_line_for_info(set_copy: Path, cli_error, capsys):
    data = json.loads((set_copy / MANIFEST_NAME).read_text())
    data["splits"][TRAIN_UNLABELED]["counts"][1] = "many"
    data["splits"][VAL]["sha256"].pop()  # a short sha list
    data["label_split"]["labeled_per_class"] = "five"
    data["image"] = [90]
    data["skipped"] = [3]
    (set_copy / MANIFEST_NAME).write_text(json.dumps(data))
    (set_copy / "notes.txt").write_text("my notes")
    assert main(["verify", str(set_copy)]) == 1
    captured = capsys.readouterr()
    report = captured.out
    assert "manifest.json: splits.train-unlabeled.counts[1] is 'many', not a whole number >= 0" in report
    assert "manifest.json: splits.val: 3 shards but 2 sha256 values" in report
    assert "manifest.json: label_split.labeled_per_class is 'five', not a list of counts" in report
    assert "manifest.json: image is [90], not an object" in report
    assert "manifest.json: skipped[0] is 3" in report
    assert "notes.txt: an unexpected file in the set" in report
    assert report.strip().endswith("6 problem(s)") and "Traceback" not in captured.err
    line = cli_error(["info", str(set_copy)])
    assert "not a valid mt-scale manifest: " in line and "(and 4 more)" in line and "mt-shard verify" in line
    for garbage in (b"[1, 2]", b"\xff\xfe binary", b"[" * 100_000):
        (set_copy / MANIFEST_NAME).write_bytes(garbage)
        assert "manifest.json" in cli_error(["verify", str(set_copy)])
        assert "manifest.json" in cli_error(["info", str(set_copy)])


def test_names_from_the_set_cannot_forge_output_lines(set_copy: Path, capsys):
    data = json.loads((set_copy / MANIFEST_NAME).read_text())
    data["skipped"] = [{"path": "a.jpg\n\x1b[2Jset: OK", "reason": "x\ry"}]
    data["source"] = "\x1b]0;pwned\x07"
    (set_copy / MANIFEST_NAME).write_text(json.dumps(data))
    (set_copy / "evil\nset: OK").write_text("")
    assert main(["info", str(set_copy)]) == 0
    info = capsys.readouterr().out
    assert "\x1b" not in info and "'a.jpg\\n\\x1b[2Jset: OK': 'x\\ry'" in info
    assert main(["verify", str(set_copy)]) == 1
    report = capsys.readouterr().out
    assert "\x1b" not in report and "'evil\\nset: OK': an unexpected file in the set" in report
    assert len(report.strip().splitlines()) == 2  # that problem and the summary


def test_damaged_set_files_are_listed_by_verify(set_copy: Path, capsys):
    labels = (set_copy / LABELS_NAME).read_text().splitlines()
    labels[2] = labels[2].split()[0]  # one field
    (set_copy / LABELS_NAME).write_text("\n".join(labels) + "\n")
    (set_copy / TRAIN_CLASSES_NAME).write_bytes(b"\x00\xff\xfe\x80" * 64)
    (set_copy / index_name("val-000001.tar")).write_bytes(b"\x89PNG\r\n\x1a\n\xff\xff")
    (set_copy / ".val-000002.tar.partial").write_bytes(b"half")
    (set_copy / "extra").mkdir()
    assert main(["verify", str(set_copy)]) == 1
    captured = capsys.readouterr()
    report = captured.out
    assert f"{LABELS_NAME}:3: expected '<key> <class name>', got" in report
    assert f"{TRAIN_CLASSES_NAME}: not a text file" in report
    assert "val-000001.idx: does not match the tar's members" in report
    assert ".val-000002.tar.partial: an unexpected file in the set" in report
    assert "extra: an unexpected folder in the set" in report
    assert "Traceback" not in captured.err


def test_parse_index_refuses_member_names_that_are_paths():
    good = "v1.2 1\ncls 512 1 a.cls jpg 1536 600 a.jpg\n"
    assert parse_index(good) == [("a", {"cls": (512, 1), "jpg": (1536, 600)})]
    for bad in ("v1.2 1\njpg 512 1 ../../x.jpg\n", "v1.2 1\njpg 512 1 /etc/x.jpg\n", "v1.2 1\njpg 512 1 a/b.jpg\n",
                "v1.2 1\njpg -5 1 a.jpg\n", "v1.2 1\njpg 512 1 a.jpg cls 9 1 b.cls\n", "v1.2 1\njpg 5 ² a.jpg\n"):
        with pytest.raises(ShardFormatError, match="x.idx:2: member"):
            parse_index(bad, "x.idx")


def test_resplit_refuses_a_truncated_or_altered_shard(set_copy: Path, tmp_path: Path, cli_error):
    new_out = tmp_path / "new"
    unlabeled = set_copy / read_manifest(set_copy).split(TRAIN_UNLABELED).shards[1]
    data = unlabeled.read_bytes()
    unlabeled.write_bytes(data[: len(data) // 3])
    line = cli_error(["resplit", str(set_copy), str(new_out), "--labels-per-class", "3", "--quiet"])
    assert f"{unlabeled}: {len(data) // 3} bytes, the manifest says {len(data)}" in line
    assert f"run mt-shard verify {set_copy}" in line
    unlabeled.write_bytes(data)
    val = set_copy / "val-000002.tar"
    altered = bytearray(val.read_bytes())
    altered[700] ^= 0xFF  # same size, one byte of an image changed
    val.write_bytes(bytes(altered))
    line = cli_error(["resplit", str(set_copy), str(new_out), "--labels-per-class", "3", "--quiet"])
    assert f"{val}: sha256 differs from the manifest" in line
    assert not new_out.exists() and not partial_path(new_out).exists()


def test_resplit_refuses_hostile_keys_in_train_classes(set_copy: Path, tmp_path: Path, cli_error):
    lines = (set_copy / TRAIN_CLASSES_NAME).read_text().splitlines()
    lines[0] = "../../evil " + lines[0].split()[1]
    (set_copy / TRAIN_CLASSES_NAME).write_text("\n".join(lines) + "\n")
    line = cli_error(["resplit", str(set_copy), str(tmp_path / "new"), "--quiet"])
    assert "train-classes.txt:1: '../../evil' is not a valid key" in line
    assert not (tmp_path / "new").exists()


def test_interrupted_resplit_leaves_no_newout_and_a_rerun_starts_over(set_copy: Path, tmp_path: Path, monkeypatch,
                                                                      capsys, cli_error):
    new_out = tmp_path / "runs" / "new"
    real = resplit_module.write_shard
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(resplit_module, "write_shard", interrupted)
    assert main(["resplit", str(set_copy), str(new_out), "--labels-per-class", "3", "--quiet"]) == 130
    assert f"interrupted; nothing was written to {new_out}; run the same command again" in capsys.readouterr().err
    assert not new_out.exists() and not partial_path(new_out).exists() and not (tmp_path / "runs").exists()
    monkeypatch.setattr(resplit_module, "write_shard", real)
    # What a kill -9 leaves: the temporary folder, marked as ours. The rerun discards it and says so.
    leftover = partial_path(new_out)
    leftover.mkdir(parents=True)
    (leftover / MARKER_NAME).write_text("{}")
    (leftover / "train-labeled-000000.tar").write_bytes(b"half")
    assert main(["resplit", str(set_copy), str(new_out), "--labels-per-class", "3", "--quiet"]) == 0
    assert "discarded the unfinished re-split an earlier run left in" in capsys.readouterr().out
    assert not leftover.exists() and main(["verify", str(new_out)]) == 0
    capsys.readouterr()
    stranger = partial_path(tmp_path / "other")
    stranger.mkdir()
    (stranger / "mine.txt").write_text("keep")
    assert "was not left by mt-shard resplit" in cli_error(["resplit", str(set_copy), str(tmp_path / "other")])
    assert (stranger / "mine.txt").read_text() == "keep"


def test_resplit_output_location_errors(set_copy: Path, tmp_path: Path, read_only_dir: Path, cli_error, snapshot):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    before = snapshot(tmp_path / "set")
    cases = {
        str(a_file / "new"): f"{a_file} is a file, not a folder",
        "/proc/mt-shard-test/new": "/proc/mt-shard-test/new: cannot write there in /proc",
        str(read_only_dir / "new"): f"{read_only_dir / 'new'}: cannot write there",
        str(a_file): f"{a_file}: is a file, not a folder; choose another NEWOUT",
        str(set_copy / "inside"): "is inside the shard set",
    }
    for new_out, expected in cases.items():
        line = cli_error(["resplit", str(set_copy), new_out, "--quiet"])
        assert expected in line, line
    assert a_file.read_text() == "x" and list(read_only_dir.iterdir()) == []
    assert not Path("/proc/mt-shard-test").exists() and snapshot(tmp_path / "set") == before


def test_resplit_no_space_left_leaves_nothing(set_copy: Path, tmp_path: Path, mount_tmpfs, monkeypatch, cli_error):
    small = tmp_path / "small"
    if not mount_tmpfs(small, "size=1m"):
        # No tmpfs (not root): the same failure, raised where the shard bytes are written.
        real = resplit_module.write_shard

        def full(folder, name, samples):
            if name.startswith(TRAIN_UNLABELED):
                raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / name))
            return real(folder, name, samples)

        monkeypatch.setattr(resplit_module, "write_shard", full)
    new_out = small / "runs" / "new"
    line = cli_error(["resplit", str(set_copy), str(new_out), "--labels-per-class", "3", "--quiet"])
    assert "No space left on device" in line and f"nothing was written to {new_out}" in line
    assert str(small) in line
    assert list(small.iterdir()) == []


def test_resplit_lower_items(set_copy: Path, tmp_path: Path, cli_error):
    new_out = str(tmp_path / "new")
    assert "--seed -1: must be a whole number, 0 or more" in cli_error(["resplit", str(set_copy), new_out, "--seed", "-1"])
    assert "--shard-size 0: must be at least 1" in cli_error(["resplit", str(set_copy), new_out, "--shard-size", "0"])
    assert "--shard-size -3" in cli_error(["resplit", str(set_copy), new_out, "--shard-size", "-3"])
    assert not Path(new_out).exists()
    data = json.loads((set_copy / MANIFEST_NAME).read_text())
    data["pack_args"]["shard_size"] = "lots"
    (set_copy / MANIFEST_NAME).write_text(json.dumps(data))
    assert "pack_args.shard_size is 'lots'; give --shard-size" in cli_error(["resplit", str(set_copy), new_out])


def test_verify_and_loaders_refuse_sets_whose_shards_name_other_splits(set_copy: Path, cli_error):
    data = json.loads((set_copy / MANIFEST_NAME).read_text())
    data["splits"][TRAIN_LABELED]["shards"][0] = "val-000000.tar"  # a val shard read as labeled training data
    (set_copy / MANIFEST_NAME).write_text(json.dumps(data))
    assert "train-labeled shard name 'val-000000.tar'" in cli_error(["verify", str(set_copy)])
