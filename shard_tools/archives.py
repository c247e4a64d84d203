"""Packing straight from the archives users download, without extracting them.

`load_archive` tells the layouts apart and reads each; how a member is found and read in place is
shard_tools.archive_files.

- `ILSVRC2012_img_train.tar`: an uncompressed tar of one uncompressed `<wnid>.tar` per class, each
  holding `<wnid>_<n>.JPEG`. One pass over the outer tar's headers and each inner tar's headers
  records where every image's bytes lie in the outer file (`ArchiveMember`); an image is then read
  with one seek and one read, so packing stays parallel (one task per shard), resumable and in the
  global shuffled order, exactly as for a folder tree. Classes are the wnids, sorted.
- `ILSVRC2012_img_val.tar` (flat `ILSVRC2012_val_NNNNNNNN.JPEG`; the same images in a flat folder
  work too) with `--val-labels`: a `<file name> <wnid>` list (whitespace or comma separated, so the
  first two fields of LOC_val_solution.csv work) or the devkit tarball `ILSVRC2012_devkit_t12.tar.gz`
  (data/ILSVRC2012_validation_ground_truth.txt + data/meta.mat).
- `cifar-10-binary.tar.gz`: read by shard_tools.cifar; the python version of the archive holds
  pickles and is refused: nothing here unpickles.

`attach_val` gives any train source its val part from `--val` (a class tree, a list, or a flat
archive or folder with `--val-labels`).
"""

from __future__ import annotations

import io
import tarfile
import zlib
from pathlib import Path

import numpy as np

from shard_tools.archive_files import (
    ArchiveMember,
    archive_format,
    clean_name,
    damaged_archive,
    is_archive,
    small_members,
    tar_files,
)
from shard_tools.cifar import CIFAR_BINARY_URL, CIFAR_DIR, CIFAR_META, load_cifar
from shard_tools.format import ShardFormatError
from shard_tools.sources import (
    Collection,
    Item,
    _check_class_names,
    _class_index,
    _files_under,
    _list_items,
    _read_list,
    _tree_part,
    key_for,
    read_classes_file,
)

DEVKIT_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"
_KNOWN = ("ILSVRC2012_img_train.tar (one <wnid>.tar per class), a flat val tar with --val, "
          "or cifar-10-binary.tar.gz")


def _stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def _first_member(path: Path, compression: str) -> str:
    """The name of the archive's first regular file, to tell the layouts apart."""
    mode = {"tar": "r:", "gzip": "r:gz", "bzip2": "r:bz2", "xz": "r:xz"}[compression]
    try:
        with tarfile.open(path, mode) as archive:
            for member in archive:
                if member.isfile():
                    return clean_name(member.name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise damaged_archive(path, exc) from None
    raise ShardFormatError(f"{path}: the archive holds no files; expected {_KNOWN}")


def _layout(path: Path) -> str:
    """'ilsvrc-train', 'flat', 'cifar-binary'; raises for the pickled CIFAR and anything unknown."""
    compression = archive_format(path)
    if compression == "zip":
        raise ShardFormatError(f"{path}: a zip archive; expected {_KNOWN}")
    first = _first_member(path, compression)
    top = first.split("/", 1)[0]
    if top.startswith("cifar") and (top.endswith("-py") or top.endswith("-python")):
        raise ShardFormatError(
            f"{path}: the python version of CIFAR holds pickles, which mt-shard never loads; download the "
            f"binary version ({CIFAR_BINARY_URL}) and pack that"
        )
    if top == CIFAR_DIR:
        return "cifar-binary"
    if compression != "tar":
        raise ShardFormatError(f"{path}: a {compression}-compressed archive of an unknown layout; expected {_KNOWN} "
                               "(decompress a compressed ImageNet tar first: images are read by offset)")
    return "ilsvrc-train" if first.endswith(".tar") else "flat"


def load_archive(path: Path, classes_file: str | None, progress: bool = False) -> Collection:
    """The Collection of a train archive: ILSVRC2012_img_train.tar or cifar-10-binary.tar.gz."""
    layout = _layout(path)
    if layout == "cifar-binary":
        if classes_file:
            raise ShardFormatError(f"{path}: CIFAR's classes come from {CIFAR_META}; drop --classes")
        return load_cifar(path)
    if layout == "flat":
        raise ShardFormatError(f"{path}: holds images, not one <wnid>.tar per class; give it as --val "
                               "(with --val-labels) beside the train archive")
    return _load_ilsvrc_train(path, classes_file, progress)


def _load_ilsvrc_train(path: Path, classes_file: str | None, progress: bool) -> Collection:
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
        classes = _check_class_names(sorted(per_class), str(path))
    items, archive = [], str(path)  # one string shared by every member
    for wnid, files in per_class.items():
        label = _class_index(classes, wnid, f"{path}: {wnid}.tar", classes_file)
        for name, offset, size in files:
            origin = f"{wnid}/{name}"
            items.append(Item(key_for(origin), label, origin, path=ArchiveMember(archive, offset, size)))
    return Collection(f"archive {path}", classes, items, None, 0.1, skipped)


def _devkit_labels(path: Path) -> dict[str, tuple[str, str]]:
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


def _labeled_val(files: list[tuple[str, str | ArchiveMember]], labels_path: Path, classes: list[str]) -> list[Item]:
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


def _load_val(val: Path, val_labels: str | None, classes: list[str], classes_file: str | None) -> tuple[list, str]:
    """The val Items of `--val` and how they were found ('archive', 'folder' or 'list')."""
    if val.is_file() and is_archive(val):
        if _layout(val) != "flat":
            raise ShardFormatError(f"{val}: not a flat archive of val images; give ILSVRC2012_img_val.tar to --val")
        if not val_labels:
            raise ShardFormatError(f"{val}: a val archive names no classes; add --val-labels FILE (a "
                                   "'<file name> <wnid>' list, LOC_val_solution.csv or ILSVRC2012_devkit_t12.tar.gz)")
        with open(val, "rb", buffering=0) as handle:
            archive = str(val)
            files = [(name, ArchiveMember(archive, offset, size)) for name, offset, size in tar_files(val, handle)]
        return _labeled_val(files, Path(val_labels), classes), "archive"
    if val.is_dir() and val_labels:  # a flat folder of val images, e.g. the extracted val archive
        files = [(file.relative_to(val).as_posix(), str(file)) for file in _files_under(val)]
        return _labeled_val(files, Path(val_labels), classes), "folder"
    if val_labels:
        raise ShardFormatError(f"{val}: --val-labels applies to a flat val archive or folder; a list or a class "
                               "tree names each image's class itself")
    if val.is_dir():
        items = _tree_part(val, val, classes, classes_file, need_all=False)
        return [Item(key_for("val/" + item.origin), item.label, item.origin, item.path) for item in items], "folder"
    if val.is_file():
        return _list_items(val, _read_list(val, classes, classes_file), classes, prefix="val/"), "list"
    raise ShardFormatError(f"{val}: no such val folder, file list or archive; check --val")


def attach_val(collection: Collection, val: str | None, val_labels: str | None, classes_file: str | None) -> None:
    """Give `collection` the val part `--val` names (with `--val-labels` for a flat archive or folder)."""
    if val is None:
        raise ShardFormatError("--val-labels names the classes of --val images; add --val")
    if collection.val is not None:
        raise ShardFormatError(f"{collection.description.split(' ', 1)[-1]}: has its own val part; drop --val")
    if val_labels is not None and not Path(val_labels).is_file():
        raise ShardFormatError(f"{val_labels}: no such val labels file; check --val-labels")
    collection.val, collection.val_method = _load_val(Path(val), val_labels, collection.classes, classes_file)
