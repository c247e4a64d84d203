"""Packing from the downloaded archives: ILSVRC2012 train/val tars with each val label form, the
devkit, the reference's label files, resume, bad members; the CIFAR-10 binary archive; errors."""

from __future__ import annotations

import io
import json
import pickle
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import shard_tools.pack as pack_module
from shard_tools.cli import main
from shard_tools.format import (
    LABELS_NAME,
    MANIFEST_NAME,
    TRAIN_LABELED,
    TRAIN_UNLABELED,
    VAL,
    ShardFormatError,
    decode_class,
)
from shard_tools.manifest import read_manifest, shard_paths
from shard_tools.pack import pack
from shard_tools.sources.cifar import cifar_records
from shard_tools.verify import verify

# Outer tar order is not wnid order: classes must come out sorted.
WNIDS = ["n01484850", "n01440764", "n01443537"]
PER_CLASS = 4
VAL_WNIDS = ["n01443537", "n01440764", "n01484850", "n01440764", "n01443537", "n01484850"]
# The devkit numbers classes by ILSVRC2012_ID, not in wnid order; 1001 is a non-leaf synset.
DEVKIT_IDS = {"n01443537": 1, "n01484850": 2, "n01440764": 3, "n00001740": 1001}
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_TEST_LABELS = [3, 1, 4, 1, 5]


def _jpeg(seed: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode != "RGB" else image).save(buffer, format=fmt)
    return buffer.getvalue()


def _tar(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _train_images() -> dict[str, list[tuple[str, bytes]]]:
    images = {wnid: [(f"{wnid}_{n}.JPEG", _jpeg(100 * c + n)) for n in range(1, PER_CLASS + 1)]
              for c, wnid in enumerate(WNIDS)}
    # What the real archive holds besides plain JPEGs: a CMYK JPEG and a PNG named .JPEG (both
    # kept by re-encoding), and here also a truncated JPEG (skipped).
    images["n01440764"] += [("n01440764_90.JPEG", _jpeg(90, mode="CMYK")),
                            ("n01440764_91.JPEG", _jpeg(91, fmt="PNG")),
                            ("n01440764_92.JPEG", _jpeg(92)[:300])]
    return images


def _ilsvrc_train(folder: Path) -> Path:
    outer = [(f"{wnid}.tar", _tar(files)) for wnid, files in _train_images().items()]
    path = folder / "ILSVRC2012_img_train.tar"
    path.write_bytes(_tar(outer))
    return path


def _val_images() -> list[tuple[str, bytes]]:
    return [(f"ILSVRC2012_val_{n:08d}.JPEG", _jpeg(1000 + n)) for n in range(1, len(VAL_WNIDS) + 1)]


def _devkit(path: Path, truth: list[int]) -> Path:
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    synsets = np.zeros((len(DEVKIT_IDS), 1), dtype=[(name, "O") for name in fields])
    for row, (wnid, number) in enumerate(DEVKIT_IDS.items()):
        leaf = number <= 1000
        synsets[row, 0] = (np.array([[number]], np.uint16), wnid, f"words {wnid}", "gloss",
                           np.array([[0 if leaf else 2]], np.uint8),
                           np.zeros((1, 0)) if leaf else np.array([[1, 2]], np.uint16), 0, 1300)
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    text = "".join(f"{number}\n" for number in truth).encode()
    path.write_bytes(_tar([("ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue()),
                           ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", text),
                           ("ILSVRC2012_devkit_t12/readme.txt", b"devkit")], mode="w:gz"))
    return path


def _val_labels(folder: Path, form: str) -> Path:
    names = [name for name, _ in _val_images()]
    if form == "list":
        path = folder / "val_labels.txt"
        path.write_text("".join(f"{name} {wnid}\n" for name, wnid in zip(names, VAL_WNIDS, strict=True)))
    elif form == "loc":  # LOC_val_solution.csv: no extension, a prediction string after the comma
        path = folder / "LOC_val_solution.csv"
        path.write_text("ImageId,PredictionString\n" + "".join(
            f"{name[:-5]},{wnid} 10 20 30 40 {wnid} 1 2 3 4 \n" for name, wnid in zip(names, VAL_WNIDS, strict=True)))
    else:
        path = _devkit(folder / "ILSVRC2012_devkit_t12.tar.gz", [DEVKIT_IDS[wnid] for wnid in VAL_WNIDS])
    return path


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ilsvrc")
    _ilsvrc_train(folder)
    (folder / "ILSVRC2012_img_val.tar").write_bytes(_tar(_val_images()))
    flat = folder / "val-folder"
    flat.mkdir()
    for name, data in _val_images():
        (flat / name).write_bytes(data)
    for form in ("list", "loc", "devkit"):
        _val_labels(folder, form)
    return folder


def _samples(out: Path, split: str) -> dict[str, dict]:
    """key -> {"cls", "source", "jpg"} of every sample of a split."""
    samples: dict[str, dict] = {}
    for path in shard_paths(out, split):
        with tarfile.open(path) as archive:
            for member in archive:
                key, _, ext = member.name.partition(".")
                data = archive.extractfile(member).read()
                entry = samples.setdefault(key, {})
                if ext == "cls":
                    entry["cls"] = decode_class(data)
                elif ext == "json":
                    entry["source"] = json.loads(data)["source"]
                elif ext == "jpg":
                    entry["jpg"] = data
    return samples


def _labels_of(form: str) -> str:
    return {"list": "val_labels.txt", "loc": "LOC_val_solution.csv", "devkit": "ILSVRC2012_devkit_t12.tar.gz"}[form]


@pytest.mark.parametrize(("val_form", "labels_form"),
                         [("archive", "list"), ("archive", "loc"), ("archive", "devkit"), ("folder", "loc")])
def test_ilsvrc_archives_pack_with_every_val_label_form(imagenet: Path, tmp_path: Path, val_form: str,
                                                        labels_form: str):
    val = imagenet / ("ILSVRC2012_img_val.tar" if val_form == "archive" else "val-folder")
    out = tmp_path / "out"
    summary = pack(imagenet / "ILSVRC2012_img_train.tar", out, labels_per_class=2, val_list=val,
                   val_labels=imagenet / _labels_of(labels_form), shard_size=5, workers=2, progress=False)
    manifest = read_manifest(out)
    assert manifest.classes == sorted(WNIDS)
    # 3 x 4 plain JPEGs + the CMYK and the PNG; the truncated one is skipped and counted.
    assert summary.counts == {TRAIN_LABELED: 6, TRAIN_UNLABELED: 8, VAL: 6} and summary.skipped == 1
    assert [(e["path"], e["reason"].split(":")[0]) for e in manifest.skipped] == \
           [("n01440764/n01440764_92.JPEG", "corrupt or truncated")]
    assert manifest.label_split["labeled_per_class"] == [2, 2, 2]
    assert manifest.val_split == {"method": "archive" if val_form == "archive" else "folder"}
    val_samples = _samples(out, VAL)
    assert len(val_samples) == 6
    for sample in val_samples.values():
        number = int(re.search(r"_(\d{8})\.JPEG$", sample["source"]).group(1))
        assert manifest.classes[sample["cls"]] == VAL_WNIDS[number - 1]
    train = {**_samples(out, TRAIN_LABELED), **_samples(out, TRAIN_UNLABELED)}
    assert "n01440764-n01440764_1" in train and train["n01440764-n01440764_1"]["source"] == "n01440764/n01440764_1.JPEG"
    originals = dict(image for files in _train_images().values() for image in files)
    for sample in train.values():
        name = sample["source"].split("/")[1]
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB"
        if name.endswith(("_90.JPEG", "_91.JPEG")):  # CMYK and PNG: re-encoded, same size
            assert sample["jpg"] != originals[name] and image.size == (40, 30)
        else:  # plain RGB JPEGs keep their bytes, read straight out of the nested tars
            assert sample["jpg"] == originals[name]
    assert verify(out, decode=True) == []


def test_reference_labels_file_for_the_archive_and_a_tree(imagenet: Path, tmp_path: Path):
    # The reference's data-local/labels/ilsvrc2012/128000_balanced_labels/00.txt format.
    chosen = [f"{wnid}_{n}.JPEG" for wnid in WNIDS for n in (1, 3)] + ["n01440764_91.JPEG"]
    labels = tmp_path / "00.txt"
    labels.write_text("".join(f"{name} {name.split('_')[0]}\n" for name in chosen))
    tree = tmp_path / "tree"
    for wnid, files in _train_images().items():
        (tree / "train" / wnid).mkdir(parents=True)
        for name, data in files:
            (tree / "train" / wnid / name).write_bytes(data)
    for source in (imagenet / "ILSVRC2012_img_train.tar", tree):
        out = tmp_path / f"out-{source.name}"
        pack(source, out, labels_file=labels, val_fraction=0, workers=1, progress=False)
        labeled = _samples(out, TRAIN_LABELED)
        assert sorted(s["source"].rsplit("/", 1)[-1] for s in labeled.values()) == sorted(chosen)
        assert read_manifest(out).label_split["labeled_per_class"] == [3, 2, 2]
        assert len((out / LABELS_NAME).read_text().splitlines()) == 7


def test_archive_pack_resumes_after_an_interrupt(imagenet: Path, tmp_path: Path, monkeypatch):
    args = dict(labels_per_class=1, val_list=imagenet / "ILSVRC2012_img_val.tar",
                val_labels=imagenet / "ILSVRC2012_devkit_t12.tar.gz", shard_size=3, workers=1, progress=False)
    train = imagenet / "ILSVRC2012_img_train.tar"
    real, calls = pack_module._pack_shard, {"n": 0}

    def dies_on_third(task):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(pack_module, "_pack_shard", dies_on_third)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        pack(train, out, **args)
    monkeypatch.setattr(pack_module, "_pack_shard", real)
    assert not (out / MANIFEST_NAME).exists() and len(list(out.glob("*.tar"))) == 2
    summary = pack(train, out, **args)
    assert summary.shards_kept == 2 and summary.counts[VAL] == 6
    fresh = tmp_path / "fresh"
    pack(train, fresh, **args)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in fresh.iterdir()}


def _cifar_image(number: int) -> np.ndarray:
    """A smooth 32x32 RGB image (JPEG keeps smooth images close), different for every record."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([x * 6 + number, y * 5 + 2 * number, np.full_like(x, 20 + 7 * number)], -1).astype(np.uint8)


def _cifar_batch(labels: list[int], first: int) -> bytes:
    rows = [np.concatenate([[label], _cifar_image(first + i).transpose(2, 0, 1).ravel()]).astype(np.uint8)
            for i, label in enumerate(labels)]
    return np.stack(rows).tobytes()


def _cifar_archive(path: Path, python: bool = False) -> Path:
    if python:
        members = [("cifar-10-batches-py/batches.meta", b"\x80\x04not read"),
                   ("cifar-10-batches-py/data_batch_1", b"\x80\x04not read")]
    else:
        members = [("cifar-10-batches-bin/batches.meta.txt", ("\n".join(CIFAR_CLASSES) + "\n\n").encode())]
        for batch in range(5):  # 6 records each: 30 training images, 3 of each class
            labels = [(6 * batch + i) % 10 for i in range(6)]
            members.append((f"cifar-10-batches-bin/data_batch_{batch + 1}.bin", _cifar_batch(labels, 6 * batch)))
        members.append(("cifar-10-batches-bin/test_batch.bin", _cifar_batch(CIFAR_TEST_LABELS, 100)))
        members.append(("cifar-10-batches-bin/readme.html", b"<html></html>"))
    path.write_bytes(_tar(members, mode="w:gz"))
    return path


def test_cifar_binary_archive(tmp_path: Path):
    archive = _cifar_archive(tmp_path / "cifar-10-binary.tar.gz")
    out = tmp_path / "out"
    summary = pack(archive, out, labels_per_class=2, shard_size=8, workers=1, progress=False)
    manifest = read_manifest(out)
    assert manifest.classes == CIFAR_CLASSES
    assert summary.counts == {TRAIN_LABELED: 20, TRAIN_UNLABELED: 10, VAL: 5} and summary.skipped == 0
    assert manifest.label_split["labeled_per_class"] == [2] * 10
    assert manifest.val_split == {"method": "archive"}
    val = _samples(out, VAL)
    assert sorted(val) == [f"cifar-test-{n:05d}" for n in range(5)]
    assert [val[f"cifar-test-{n:05d}"]["cls"] for n in range(5)] == CIFAR_TEST_LABELS
    train = {**_samples(out, TRAIN_LABELED), **_samples(out, TRAIN_UNLABELED)}
    assert sorted(train) == [f"cifar-train-{n:05d}" for n in range(30)]
    for key, sample in {**train, **val}.items():
        number = int(key[-5:])
        first = 100 if key.startswith("cifar-test") else 0
        label = CIFAR_TEST_LABELS[number] if first else number % 10
        if sample["cls"] != -1:
            assert sample["cls"] == label
        assert sample["source"] == f"{'test' if first else 'train'}/{CIFAR_CLASSES[label]}/{number}_{CIFAR_CLASSES[label]}.png"
        decoded = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.int16)
        difference = np.abs(decoded - _cifar_image(first + number))
        assert difference.mean() < 1.5 and difference.max() <= 12, key
    assert verify(out, decode=True) == []


def test_cifar_records_are_label_then_rgb_planes():
    record = np.zeros(3073, np.uint8)
    record[0], record[1 + 5], record[1 + 1024 + 32], record[1 + 2048 + 33] = 7, 200, 100, 50
    labels, images = cifar_records(record.tobytes() * 2)
    assert labels.tolist() == [7, 7] and images.shape == (2, 32, 32, 3)
    assert images[0, 0, 5].tolist() == [200, 0, 0] and images[0, 1, 0].tolist() == [0, 100, 0]
    assert images[0, 1, 1].tolist() == [0, 0, 50] and int(images[0].sum()) == 350


def test_cifar_reference_labels_file(tmp_path: Path):
    archive = _cifar_archive(tmp_path / "cifar-10-binary.tar.gz")
    # The reference's data-local/labels/cifar10/4000_balanced_labels/00.txt format.
    labels = tmp_path / "00.txt"
    labels.write_text("".join(f"{n}_{CIFAR_CLASSES[n % 10]}.png {CIFAR_CLASSES[n % 10]}\n" for n in (0, 11, 22, 29)))
    out = tmp_path / "out"
    pack(archive, out, labels_file=labels, workers=1, progress=False)
    assert sorted(_samples(out, TRAIN_LABELED)) == ["cifar-train-00000", "cifar-train-00011", "cifar-train-00022",
                                                    "cifar-train-00029"]


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mt-shard pack: error: ") and "Traceback" not in err, err
    return lines[0]


def test_the_pickled_cifar_archive_is_refused_unread(tmp_path: Path, capsys, monkeypatch):
    def never(*_args, **_kwargs):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    archive = _cifar_archive(tmp_path / "cifar-10-python.tar.gz", python=True)
    line = _error(capsys, ["pack", str(archive), str(tmp_path / "out"), "--quiet"])
    assert "pickles" in line and "cifar-10-binary.tar.gz" in line and not (tmp_path / "out").exists()


def test_archive_errors_are_one_line(imagenet: Path, tmp_path: Path, capsys):
    train, val = str(imagenet / "ILSVRC2012_img_train.tar"), str(imagenet / "ILSVRC2012_img_val.tar")
    out = str(tmp_path / "out")
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes((imagenet / "ILSVRC2012_img_train.tar").read_bytes()[:9000])
    assert "damaged.tar: damaged archive" in _error(capsys, ["pack", str(damaged), out, "--quiet"])
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.writestr("a.JPEG", _jpeg(1))
    assert "images.zip: a zip archive; expected ILSVRC2012_img_train.tar" in \
           _error(capsys, ["pack", str(tmp_path / "images.zip"), out, "--quiet"])
    assert "holds images, not one <wnid>.tar per class" in _error(capsys, ["pack", val, out, "--quiet"])
    assert "add --val-labels" in _error(capsys, ["pack", train, out, "--val", val, "--quiet"])
    partial = tmp_path / "partial.txt"
    partial.write_text("".join(f"ILSVRC2012_val_{n:08d}.JPEG n01440764\n" for n in range(1, 6)))
    line = _error(capsys, ["pack", train, out, "--val", val, "--val-labels", str(partial), "--quiet"])
    assert "partial.txt: has no class for 1 of the 6 val images (first: ILSVRC2012_val_00000006.JPEG)" in line
    stranger = tmp_path / "stranger.txt"
    stranger.write_text("".join(f"ILSVRC2012_val_{n:08d}.JPEG n09999999\n" for n in range(1, 7)))
    line = _error(capsys, ["pack", train, out, "--val", val, "--val-labels", str(stranger), "--quiet"])
    assert "stranger.txt:1: class 'n09999999' is not among the 3 training classes" in line
    bad_devkit = _devkit(tmp_path / "devkit.tar.gz", [1, 2, 3, 4, 5, 6])
    line = _error(capsys, ["pack", train, out, "--val", val, "--val-labels", str(bad_devkit), "--quiet"])
    assert "ILSVRC2012_validation_ground_truth.txt:4: '4' is no ILSVRC2012_ID of data/meta.mat" in line
    assert not (tmp_path / "out").exists()


def test_val_option_takes_a_tree_and_val_list_still_works(imagenet: Path, tmp_path: Path):
    tree = tmp_path / "val-tree"
    for name, data in _val_images():
        wnid = VAL_WNIDS[int(name[-13:-5]) - 1]
        (tree / wnid).mkdir(parents=True, exist_ok=True)
        (tree / wnid / name).write_bytes(data)
    out = tmp_path / "out"
    assert main(["pack", str(imagenet / "ILSVRC2012_img_train.tar"), str(out), "--val-list", str(tree),
                 "--workers", "1", "--quiet"]) == 0
    val = _samples(out, VAL)
    assert sorted(val) == sorted(f"val-{wnid}-ILSVRC2012_val_{n:08d}" for n, wnid in enumerate(VAL_WNIDS, 1))
    assert all(read_manifest(out).classes[s["cls"]] == s["source"].split("/")[0] for s in val.values())
    listed = tmp_path / "val.txt"
    listed.write_text("".join(f"{p.relative_to(tmp_path)} {p.parent.name}\n" for p in sorted(tree.rglob("*.JPEG"))))
    with pytest.raises(ShardFormatError, match="--val-labels applies to a flat val archive or folder"):
        pack(imagenet / "ILSVRC2012_img_train.tar", tmp_path / "x", val_list=listed,
             val_labels=imagenet / "val_labels.txt", progress=False)


def test_an_archive_member_is_read_in_place_by_its_own_type(imagenet: Path):
    from shard_tools.sources import load_source
    from shard_tools.sources.archive_files import ArchiveMember

    collection = load_source(imagenet / "ILSVRC2012_img_train.tar")
    by_origin = {item.origin: item for item in collection.train}
    item = by_origin["n01443537/n01443537_2.JPEG"]
    assert isinstance(item.path, ArchiveMember) and not isinstance(item.path, tuple)
    assert item.path.archive == str(imagenet / "ILSVRC2012_img_train.tar") and item.data is None
    expected = dict(_train_images()["n01443537"])["n01443537_2.JPEG"]
    assert item.path.read() == expected and item.path.size == len(expected)
    assert collection.classes == sorted(WNIDS) and item.label == sorted(WNIDS).index("n01443537")
