"""The ILSVRC2012 archives as downloaded, read in place without extracting them.

- `ILSVRC2012_img_train.tar`: an uncompressed tar of one uncompressed `<wnid>.tar` per class, each
  holding `<wnid>_<n>.JPEG`. One pass over the outer tar's headers and each inner tar's headers
  records where every image's bytes lie in the outer file (`ArchiveMember`); an image is then read
  with one seek and one read, so packing stays parallel (one task per shard), resumable and in the
  global shuffled order, exactly as for a folder tree. Classes are the wnids, sorted.
- `ILSVRC2012_img_val.tar` (flat `ILSVRC2012_val_NNNNNNNN.JPEG`; the same images in a flat folder
  work too) with `--val-labels`: a `<file name> <wnid>` list (whitespace or comma separated, so the
  first two fields of LOC_val_solution.csv work) or the devkit tarball `ILSVRC2012_devkit_t12.tar.gz`
  (data/ILSVRC2012_validation_ground_truth.txt + data/meta.mat).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from shard_tools.format import ShardFormatError
from shard_tools.sources.archive_files import ArchiveMember, is_archive, small_members, tar_files
from shard_tools.sources.base import (
    Collection,
    Item,
    check_class_names,
    class_index,
    files_under,
    key_for,
    read_classes_file,
)

DEVKIT_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"


def _stem(name: str) -> str:
    """A member or file name without folder and extension: how val label files name an image."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def load_ilsvrc_train(path: Path, classes_file: str | None, progress: bool = False) -> Collection:
    """ILSVRC2012_img_train.tar: one Item per image of each `<wnid>.tar`, read in place (ArchiveMember)."""
    from tqdm import tqdm

    per_class: dict[str, list[tuple[str, int, int]]] = {}
    skipped = []
    with open(path, "rb", buffering=0) as outer, open(path, "rb", buffering=0) as inner:
        class_tars = tar_files(path, outer)
        # About 1.3 million headers for ImageNet, read one seek each: worth a progress bar.
        for name, offset, size in tqdm(class_tars, desc="index", unit="tar", disable=not progress, leave=False):
            if not name.endswith(".tar"):
                skipped.append({"path": name, "reason": "not a class tar"})
                continue
            wnid = name.rsplit("/", 1)[-1][: -len(".tar")]
            if wnid in per_class:
                raise ShardFormatError(f"{path}: holds {name} twice; download the archive again")
            files = tar_files(path, inner, offset, size, where=f"{name}: ")
            if not files:
                raise ShardFormatError(f"{path}: {name} holds no images; download the archive again")
            per_class[wnid] = files
    if classes_file:
        classes = read_classes_file(classes_file)
        missing = [name for name in classes if name not in per_class]
        if missing:
            raise ShardFormatError(f"{path}: class {missing[0]!r} of {classes_file} has no {missing[0]}.tar here; "
                                   "fix the classes file")
    else:
        classes = check_class_names(sorted(per_class), str(path))
    items, archive = [], str(path)  # one string shared by every member
    for wnid, files in per_class.items():
        label = class_index(classes, wnid, f"{path}: {wnid}.tar", classes_file)
        for name, offset, size in files:
            origin = f"{wnid}/{name}"
            items.append(Item(key_for(origin), label, origin, path=ArchiveMember(archive, offset, size)))
    return Collection(f"archive {path}", classes, items, None, 0.1, skipped)


def _devkit_labels(path: Path) -> dict[str, tuple[str, str]]:
    """The devkit's ground truth by val image name, through meta.mat's ILSVRC2012_ID -> wnid table."""
    files = small_members(path, lambda name: next((k for k in (DEVKIT_TRUTH, DEVKIT_META) if name.endswith(k)), None))
    if len(files) != 2:
        raise ShardFormatError(f"{path}: not the ILSVRC2012 devkit (no {DEVKIT_META} and {DEVKIT_TRUTH}); give "
                               "ILSVRC2012_devkit_t12.tar.gz or a '<file name> <wnid>' list")
    from scipy.io import loadmat  # reads MATLAB data only: nothing in a .mat file is run

    try:
        synsets = loadmat(io.BytesIO(files[DEVKIT_META]))["synsets"].ravel()
        wnids = {int(np.asarray(s["ILSVRC2012_ID"]).ravel()[0]): str(np.asarray(s["WNID"]).ravel()[0]) for s in synsets}
    except Exception as exc:  # noqa: BLE001 - any failure to parse an untrusted file is the same user error
        raise ShardFormatError(f"{path}: {DEVKIT_META} cannot be read ({exc}); download the devkit again") from None
    labels = {}
    for number, text in enumerate(files[DEVKIT_TRUTH].decode("ascii", "replace").split(), 1):
        try:
            labels[f"ILSVRC2012_val_{number:08d}"] = (wnids[int(text)], f"{path}: {DEVKIT_TRUTH}:{number}")
        except (ValueError, KeyError):
            raise ShardFormatError(f"{path}: {DEVKIT_TRUTH}:{number}: {text!r} is no ILSVRC2012_ID of {DEVKIT_META}; "
                                   "download the devkit again") from None
    return labels


def read_val_labels(path: str | Path) -> dict[str, tuple[str, str]]:
    """{image file name without extension: (wnid, "file:line")} from a devkit tarball or a two-column list."""
    path = Path(path)
    if is_archive(path):
        return _devkit_labels(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ShardFormatError(f"{path}: cannot read the val labels ({exc}); check --val-labels") from None
    labels: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        # LOC_val_solution.csv: `<image id>,<wnid> <box> <wnid> <box> ...`; else `<file name> <wnid>`.
        name, _, rest = text.partition(",") if "," in text else (text, "", "")
        fields = [name.strip(), *rest.split()] if rest else text.split()
        if fields[0].lower() == "imageid":  # LOC_val_solution.csv's header line
            continue
        if len(fields) < 2:
            raise ShardFormatError(f"{path}:{number}: expected '<file name> <wnid>', got {text!r}")
        stem, wnid = _stem(fields[0]), fields[1]
        if labels.get(stem, (wnid,))[0] != wnid:
            raise ShardFormatError(f"{path}:{number}: {fields[0]!r} was given another class before; fix the file")
        labels[stem] = (wnid, f"{path}:{number}")
    if not labels:
        raise ShardFormatError(f"{path}: names no val image; write '<file name> <wnid>' lines")
    return labels


def labeled_val(files: list[tuple[str, str | ArchiveMember]], labels_path: Path, classes: list[str]) -> list[Item]:
    """Val Items of flat (name, file or member) pairs, each image's class from `labels_path` (read_val_labels)."""
    labels = read_val_labels(labels_path)
    index = {name: position for position, name in enumerate(classes)}
    unlabeled = [origin for origin, _ in files if _stem(origin) not in labels]
    if unlabeled:
        raise ShardFormatError(f"{labels_path}: has no class for {len(unlabeled)} of the {len(files)} val images "
                               f"(first: {unlabeled[0]}); give the labels of this val set")
    items = []
    for origin, location in files:
        wnid, where = labels[_stem(origin)]
        if wnid not in index:
            raise ShardFormatError(f"{where}: class {wnid!r} is not among the {len(classes)} training classes; "
                                   "give the val labels that belong to the train source")
        items.append(Item(key_for("val/" + origin), index[wnid], origin, path=location))
    return items


def flat_archive_val(val: Path, val_labels: Path, classes: list[str]) -> list[Item]:
    """The val Items of ILSVRC2012_img_val.tar (flat), each read in place, classes from `val_labels`."""
    with open(val, "rb", buffering=0) as handle:
        archive = str(val)
        files = [(name, ArchiveMember(archive, offset, size)) for name, offset, size in tar_files(val, handle)]
    return labeled_val(files, val_labels, classes)


def flat_folder_val(val: Path, val_labels: Path, classes: list[str]) -> list[Item]:
    """The val Items of a flat folder of val images (the extracted val archive), classes from `val_labels`."""
    return labeled_val([(file.relative_to(val).as_posix(), str(file)) for file in files_under(val)], val_labels,
                       classes)  # fmt: skip
