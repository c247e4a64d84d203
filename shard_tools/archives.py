"""Packing straight from the archives users download, without extracting them.

- `ILSVRC2012_img_train.tar`: an uncompressed tar of one uncompressed `<wnid>.tar` per class, each
  holding `<wnid>_<n>.JPEG`. One pass over the outer tar's headers and each inner tar's headers
  records where every image's bytes lie in the outer file (`ArchiveMember`); an image is then read
  with one seek and one read, so packing stays parallel (one task per shard), resumable and in the
  global shuffled order, exactly as for a folder tree. Classes are the wnids, sorted.
- `ILSVRC2012_img_val.tar` (flat `ILSVRC2012_val_NNNNNNNN.JPEG`; the same images in a flat folder
  work too) with `--val-labels`: a `<file name> <wnid>` list (whitespace or comma separated, so the
  first two fields of LOC_val_solution.csv work) or the devkit tarball `ILSVRC2012_devkit_t12.tar.gz`
  (data/ILSVRC2012_validation_ground_truth.txt + data/meta.mat).
- `cifar-10-binary.tar.gz`: decoded in memory (records of 1 label byte + the R, G and B 32x32
  planes) and stored as JPEG quality 95 without chroma subsampling. Origins follow the reference's
  unpacked names (`train/<class>/<n>_<class>.png`, n counting over data_batch_1..5), so its label
  files (`16002_airplane.png airplane`) work with `--labels`. The python version of the archive holds
  pickles and is refused: nothing here unpickles.

`attach_val` gives any train source its val part from `--val` (a class tree, a list, or a flat
archive or folder with `--val-labels`).
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from shard_tools.format import ShardFormatError
from shard_tools.imaging import BadImage
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

CIFAR_DIR = "cifar-10-batches-bin"
CIFAR_TRAIN = [f"data_batch_{n}.bin" for n in range(1, 6)]
CIFAR_TEST = "test_batch.bin"
CIFAR_META = "batches.meta.txt"
CIFAR_SIDE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE
CIFAR_QUALITY = 95
CIFAR_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
DEVKIT_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "data/meta.mat"
_MAX_SMALL_MEMBER = 64 << 20  # CIFAR batches (30 MB) and devkit files: anything larger is not one
_KNOWN = ("ILSVRC2012_img_train.tar (one <wnid>.tar per class), a flat val tar with --val, "
          "or cifar-10-binary.tar.gz")
_MAGIC = {b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"PK\x03\x04": "zip"}


class ArchiveMember(NamedTuple):
    """Where an image's bytes lie inside an uncompressed archive; an `Item.path` of archive sources."""

    archive: str
    offset: int
    size: int

    def read(self) -> bytes:
        try:
            with open(self.archive, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(self.size)
        except OSError as exc:
            raise BadImage(f"unreadable: {exc.strerror or exc}") from None
        if len(data) != self.size:
            raise BadImage("truncated: the archive ends inside this member")
        return data


def archive_format(path: str | Path) -> str | None:
    """'tar', 'gzip', 'bzip2', 'xz' or 'zip' from the first bytes; None for anything else (a list)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:
        return None
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":  # the block magic too: a list may start with "BZh"
        return "bzip2"
    return "tar" if head[257:262] == b"ustar" else None


def is_archive(path: str | Path) -> bool:
    return archive_format(path) is not None


def _damaged(path: Path, exc: BaseException | str) -> ShardFormatError:
    return ShardFormatError(f"{path}: damaged archive ({exc}); download it again")


def _clean_name(name: str) -> str:
    """A member name as a relative path: no leading './' or '/', no '..' parts (never extracted anyway)."""
    return "/".join(part for part in name.replace("\\", "/").split("/") if part not in ("", ".", ".."))


def _stem(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


class _Window(io.RawIOBase):
    """A read-only view of `size` bytes of `handle` from `start`: an inner tar inside the outer one.

    Reads stop at the window's end, so a damaged inner tar can never run into the next class's tar.
    """

    def __init__(self, handle, start: int, size: int):
        super().__init__()
        self._handle, self._start, self._size, self._position = handle, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._size - self._position))
        if not count:
            return 0
        self._handle.seek(self._start + self._position)
        got = self._handle.readinto(memoryview(buffer)[:count]) or 0
        self._position += got
        return got


def _tar_files(path: Path, handle, start: int = 0, size: int | None = None, where: str = "") -> list[tuple[str, int, int]]:
    """(clean name, absolute data offset, size) of every regular file of the tar at `start`."""
    end = os.fstat(handle.fileno()).st_size
    if size is not None:
        end = min(end, start + size)
    fileobj = handle if size is None else _Window(handle, start, size)
    files = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as archive:
            for member in archive:
                if member.isfile():
                    offset = start + member.offset_data
                    if offset + member.size > end:
                        raise tarfile.ReadError(f"{where}{member.name} runs past the end")
                    files.append((_clean_name(member.name), offset, member.size))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise _damaged(path, exc) from None
    return files


def _first_member(path: Path, compression: str) -> str:
    """The name of the archive's first regular file, to tell the layouts apart."""
    mode = {"tar": "r:", "gzip": "r:gz", "bzip2": "r:bz2", "xz": "r:xz"}[compression]
    try:
        with tarfile.open(path, mode) as archive:
            for member in archive:
                if member.isfile():
                    return _clean_name(member.name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise _damaged(path, exc) from None
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
        return _load_cifar(path)
    if layout == "flat":
        raise ShardFormatError(f"{path}: holds images, not one <wnid>.tar per class; give it as --val "
                               "(with --val-labels) beside the train archive")
    return _load_ilsvrc_train(path, classes_file, progress)


def _load_ilsvrc_train(path: Path, classes_file: str | None, progress: bool) -> Collection:
    from tqdm import tqdm

    per_class: dict[str, list[tuple[str, int, int]]] = {}
    skipped = []
    with open(path, "rb", buffering=0) as outer, open(path, "rb", buffering=0) as inner:
        class_tars = _tar_files(path, outer)
        # About 1.3 million headers for ImageNet, read one seek each: worth a progress bar.
        for name, offset, size in tqdm(class_tars, desc="index", unit="tar", disable=not progress, leave=False):
            if not name.endswith(".tar"):
                skipped.append({"path": name, "reason": "not a class tar"})
                continue
            wnid = name.rsplit("/", 1)[-1][: -len(".tar")]
            if wnid in per_class:
                raise ShardFormatError(f"{path}: holds {name} twice; download the archive again")
            files = _tar_files(path, inner, offset, size, where=f"{name}: ")
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


def _small_members(path: Path, wanted) -> dict[str, bytes]:
    """The bytes of the archive's files for which `wanted(clean name)` gives a key, by that key."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                key = wanted(_clean_name(member.name)) if member.isfile() else None
                if key is None:
                    continue
                if member.size > _MAX_SMALL_MEMBER:
                    raise ShardFormatError(f"{path}: {member.name} is {member.size} bytes, too large to be "
                                           "what it is named; download the archive again")
                found[key] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise _damaged(path, exc) from None
    return found


def _encode_rgb(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=CIFAR_QUALITY, subsampling=0)
    return buffer.getvalue()


def cifar_records(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(labels, HxWxRGB uint8 images) of a CIFAR-10 binary batch."""
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    images = records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return records[:, 0], np.ascontiguousarray(images)


def _load_cifar(path: Path) -> Collection:
    names = [*CIFAR_TRAIN, CIFAR_TEST, CIFAR_META]
    wanted = {f"{CIFAR_DIR}/{name}": name for name in names}
    files = _small_members(path, wanted.get)
    missing = [name for name in names if name not in files]
    if missing:
        raise ShardFormatError(f"{path}: no {CIFAR_DIR}/{missing[0]}; download {CIFAR_BINARY_URL} again")
    classes = [line.strip() for line in files[CIFAR_META].decode("ascii", "replace").splitlines() if line.strip()]
    _check_class_names(classes, f"{path}: {CIFAR_META}")
    parts: dict[str, list[Item]] = {"train": [], "test": []}
    for part, batch_names in (("train", CIFAR_TRAIN), ("test", [CIFAR_TEST])):
        for batch in batch_names:
            raw = files[batch]
            if not raw or len(raw) % CIFAR_RECORD:
                raise ShardFormatError(f"{path}: {batch} is not a whole number of {CIFAR_RECORD}-byte records; "
                                       f"download {CIFAR_BINARY_URL} again")
            labels, images = cifar_records(raw)
            if int(labels.max()) >= len(classes):
                raise ShardFormatError(f"{path}: {batch} holds class {int(labels.max())}, but {CIFAR_META} names "
                                       f"{len(classes)} classes; download {CIFAR_BINARY_URL} again")
            for label, image in zip(labels.tolist(), images, strict=True):
                number, name = len(parts[part]), classes[label]
                parts[part].append(Item(f"cifar-{part}-{number:05d}", label, f"{part}/{name}/{number}_{name}.png",
                                        data=_encode_rgb(image)))
    collection = Collection(f"archive {path}", classes, parts["train"], parts["test"], 0.0)
    collection.val_method = "archive"
    return collection


def _devkit_labels(path: Path) -> dict[str, tuple[str, str]]:
    files = _small_members(path, lambda name: next((k for k in (DEVKIT_TRUTH, DEVKIT_META) if name.endswith(k)), None))
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
            files = [(name, ArchiveMember(archive, offset, size)) for name, offset, size in _tar_files(val, handle)]
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
