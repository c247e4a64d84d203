"""Image collections mt-shard can pack: ImageNet-style folder trees, text file lists, the digits set.

Each source becomes a `Collection`: class names (index = position) and `Item`s, each with a key
that is unique, holds no dots and depends only on where the image came from, so an image keeps
its key however the set is later split.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from shard_tools.files import read_pairs
from shard_tools.format import ShardFormatError, is_class_name

DIGITS = "digits"
DIGITS_SIZE = 32
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_KEY = 90


@dataclass(frozen=True)
class Item:
    key: str
    label: int
    origin: str  # path as the user knows it (relative to SRC or the list), or "digits/<n>"
    path: str | tuple | None = None  # file to read (or an archive_files.ArchiveMember); None when `data` holds the bytes
    data: bytes | None = None
    where: str = ""  # "<list file>:<line>" for file-list items, for messages


@dataclass
class Collection:
    description: str
    classes: list[str]
    train: list[Item]
    val: list[Item] | None  # None: the source has no val part; pack holds one out by fraction
    default_val_fraction: float
    skipped: list[dict] = field(default_factory=list)
    val_method: str = ""  # how the val part was found ("folder", "list", "archive"); "" = as the source's kind


def key_for(origin: str) -> str:
    """A dot-free key from a relative path: extension dropped, separators and odd characters as `-`."""
    stem = origin.rsplit(".", 1)[0] if "." in origin.rsplit("/", 1)[-1] else origin
    key = _UNSAFE.sub("-", stem.replace("\\", "/").replace("/", "-")).strip("-") or "img"
    if len(key) > _MAX_KEY:
        # Keep the readable tail and make it unique with a digest of the full origin.
        key = key[-(_MAX_KEY - 13) :].lstrip("-") + "-" + hashlib.sha1(origin.encode()).hexdigest()[:12]
    return key


def _assign_unique_keys(items: list[Item]) -> list[Item]:
    seen: set[str] = set()
    unique = []
    for item in items:
        key, suffix = item.key, 2
        while key in seen:
            key = f"{item.key[: _MAX_KEY - 8]}-{suffix}"
            suffix += 1
        seen.add(key)
        unique.append(item if key == item.key else replace(item, key=key))
    return unique


def read_classes_file(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ShardFormatError(f"{path}: cannot read the classes file ({exc.strerror}); check the path") from None
    classes = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not classes:
        raise ShardFormatError(f"{path}: the classes file names no class; write one class name per line")
    dupes = sorted({name for name in classes if classes.count(name) > 1})
    if dupes:
        raise ShardFormatError(f"{path}: class {dupes[0]!r} is listed twice; list each class once")
    return _check_class_names(classes, str(path))


def _check_class_names(classes: list[str], where: str) -> list[str]:
    # labels.txt lines are '<key> <class name>': a name with a space could not be read back.
    for name in classes:
        if not is_class_name(name):
            raise ShardFormatError(f"{where}: class name {name!r} holds white space or control characters; rename it "
                                   "(e.g. use '_')")
    return classes


def _class_index(classes: list[str], name: str, where: str, classes_file: str | None) -> int:
    try:
        return classes.index(name)
    except ValueError:
        fix = f"add it to {classes_file}" if classes_file else "check the spelling"
        raise ShardFormatError(f"{where}: unknown class {name!r}; {fix}") from None


def _unreadable_folder(exc: OSError) -> None:
    raise ShardFormatError(f"{exc.filename}: cannot read this folder ({exc.strerror}); fix its permissions or move it "
                           "out of SRC") from None


def _files_under(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, onerror=_unreadable_folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return found


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        _unreadable_folder(exc)
        raise  # not reached


def _tree_part(part_dir: Path, root: Path, classes: list[str], classes_file: str | None, need_all: bool):
    class_dirs = _subfolders(part_dir)
    items, seen = [], set()
    for class_dir in class_dirs:
        label = _class_index(classes, class_dir.name, str(class_dir), classes_file)
        files = _files_under(class_dir)
        if not files:
            raise ShardFormatError(f"{class_dir}: empty class folder; add images or remove the folder")
        seen.add(class_dir.name)
        for file in files:
            origin = file.relative_to(root).as_posix()
            items.append(Item(key_for(origin), label, origin, path=str(file)))
    missing = [name for name in classes if name not in seen]
    if need_all and missing:
        raise ShardFormatError(f"{part_dir}: class {missing[0]!r} has no folder here; add its images")
    if not items:
        raise ShardFormatError(f"{part_dir}: no class folders with images; expected {part_dir}/<class>/*.JPEG")
    return items


def _load_tree(root: Path, classes_file: str | None) -> Collection:
    train_dir = root / "train" if (root / "train").is_dir() else root
    val_dir = root / "val" if train_dir != root and (root / "val").is_dir() else None
    if classes_file:
        classes = read_classes_file(classes_file)
    else:
        classes = [p.name for p in _subfolders(train_dir)]
        _check_class_names(classes, str(train_dir))
        if not classes:
            raise ShardFormatError(f"{train_dir}: no class folders; expected {train_dir}/<class>/<image files>")
    train = _tree_part(train_dir, root, classes, classes_file, need_all=True)
    val = _tree_part(val_dir, root, classes, classes_file, need_all=False) if val_dir else None
    stray = [p for p in train_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    skipped = [{"path": p.relative_to(root).as_posix(), "reason": "not inside a class folder"} for p in sorted(stray)]
    return Collection(f"tree {root}", classes, train, val, 0.1, skipped)


def _read_list(list_path: Path, classes: list[str] | None, classes_file: str | None) -> list[tuple[str, str, str]]:
    entries = read_pairs(list_path, "file list", "<path> <class name>", "check the path")
    if classes is not None:
        for _path, name, where in entries:
            _class_index(classes, name, where, classes_file)
    return entries


def _list_items(list_path: Path, entries, classes: list[str], prefix: str = "") -> list[Item]:
    items = []
    for path, name, where in entries:
        file = Path(path) if os.path.isabs(path) else list_path.parent / path
        origin = os.path.normpath(path).replace("\\", "/").lstrip("/")
        origin = "/".join(part for part in origin.split("/") if part != "..")
        items.append(Item(key_for(prefix + origin), classes.index(name), path, path=str(file), where=where))
    if items and not any(os.path.lexists(item.path) for item in items):
        # Not one existing file: a prose or misplaced file rather than a list with a few bad lines.
        raise ShardFormatError(
            f"{list_path}: none of its {len(items)} lines names an existing file (line 1: {items[0].origin[:40]!r}); "
            f"a file list holds '<path> <class name>' lines, relative paths from {list_path.parent}"
        )
    return items


def _refuse_duplicates(items: list[Item]) -> None:
    """One image listed twice (also under two classes, or in both the train and val lists) would
    become two samples, or leak val images into training: refused with both lines."""
    seen: dict[str, Item] = {}
    for item in items:
        real = os.path.realpath(item.path)
        first = seen.setdefault(real, item)
        if first is not item:
            raise ShardFormatError(
                f"{item.where or item.origin}: the same image as {first.where or first.origin} ({item.origin}); "
                "list each image once, "
                "under one class and in one list"
            )


def _load_list(list_path: Path, classes_file: str | None) -> Collection:
    fixed = read_classes_file(classes_file) if classes_file else None
    entries = _read_list(list_path, fixed, classes_file)
    classes = fixed or _check_class_names(sorted({name for _, name, _ in entries}), str(list_path))
    present = {name for _, name, _ in entries}
    missing = [name for name in classes if name not in present]
    if missing:
        raise ShardFormatError(f"{list_path}: class {missing[0]!r} has no image in the list; add some")
    train = _list_items(list_path, entries, classes)
    return Collection(f"list {list_path}", classes, train, None, 0.1)


def digits_jpegs(quality: int = 95) -> tuple[list[bytes], list[int]]:
    """scikit-learn's 1,797 digits as 32x32 RGB JPEGs (bicubic upscale of the 8x8, 0..16 images)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    encoded = []
    for image in images:
        big = Image.fromarray(image, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC).convert("RGB")
        buffer = io.BytesIO()
        big.save(buffer, format="JPEG", quality=quality)
        encoded.append(buffer.getvalue())
    return encoded, [int(t) for t in digits.target]


def _load_digits() -> Collection:
    encoded, targets = digits_jpegs()
    items = [
        Item(f"digits-{index:05d}", label, f"digits/{index}", data=data)
        for index, (data, label) in enumerate(zip(encoded, targets, strict=True))
    ]
    return Collection("scikit-learn digits", [str(d) for d in range(10)], items, None, 0.3)


def load_source(source: str | Path, classes_file: str | None = None, val_list: str | None = None,
                val_labels: str | None = None, progress: bool = False) -> Collection:
    """Find every image of `source` (a folder tree, a list file, an archive or "digits") and its class.

    `val_list` is the val source (`--val`: a tree, a list, or a flat archive or folder with `val_labels`).
    """
    if str(source) == DIGITS:
        if classes_file or val_list or val_labels:
            raise ShardFormatError("digits: --classes and --val apply only to folder trees, file lists and archives")
        return _load_digits()
    from shard_tools import archives  # here, not at the top: archives builds on this module

    path = Path(source)
    if path.is_file() and archives.is_archive(path):
        collection = archives.load_archive(path, classes_file, progress)
    elif path.is_dir():
        collection = _load_tree(path, classes_file)
    elif path.is_file():
        collection = _load_list(path, classes_file)
    else:
        raise ShardFormatError(f"{path}: no such folder or file list; give an image tree, a list file, an archive "
                              "or 'digits'")
    if val_list or val_labels:
        archives.attach_val(collection, val_list, val_labels, classes_file)
    _refuse_duplicates([item for item in collection.train + (collection.val or []) if isinstance(item.path, str)])
    unique = _assign_unique_keys(collection.train + (collection.val or []))
    collection.train, rest = unique[: len(collection.train)], unique[len(collection.train) :]
    collection.val = rest if collection.val is not None else None
    return collection
