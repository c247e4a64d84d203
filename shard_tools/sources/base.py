"""What every source becomes, and the readers the sources share.

A source becomes a `Collection`: class names (index = position) and `Item`s, each with a key that
is unique, holds no dots and depends only on where the image came from, so an image keeps its key
however the set is later split. The readers here (class files, class folders, file lists) serve
both the train sources and the val part of an archive source.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from shard_tools.files import read_pairs
from shard_tools.format import ShardFormatError, is_class_name
from shard_tools.sources.archive_files import ArchiveMember

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_KEY = 90


@dataclass(frozen=True)
class Item:
    key: str
    label: int
    origin: str  # path as the user knows it (relative to SRC or the list), or "digits/<n>"
    path: str | ArchiveMember | None = None  # the file, or the member of an archive; None: `data` holds the bytes
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


def assign_unique_keys(items: list[Item]) -> list[Item]:
    """`items` with a numbered suffix on every key already taken by an earlier item."""
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
    """The class names of a `--classes` file, one per line (# comments and blank lines skipped)."""
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
    return check_class_names(classes, str(path))


def check_class_names(classes: list[str], where: str) -> list[str]:
    """`classes`, after checking each can be written to labels.txt (no white space, no control characters)."""
    # labels.txt lines are '<key> <class name>': a name with a space could not be read back.
    for name in classes:
        if not is_class_name(name):
            raise ShardFormatError(f"{where}: class name {name!r} holds white space or control characters; rename it "
                                   "(e.g. use '_')")
    return classes


def class_index(classes: list[str], name: str, where: str, classes_file: str | None) -> int:
    """The position of class `name`; unknown names are refused naming `where` and the fix."""
    try:
        return classes.index(name)
    except ValueError:
        fix = f"add it to {classes_file}" if classes_file else "check the spelling"
        raise ShardFormatError(f"{where}: unknown class {name!r}; {fix}") from None


def _unreadable_folder(exc: OSError) -> None:
    raise ShardFormatError(f"{exc.filename}: cannot read this folder ({exc.strerror}); fix its permissions or move it "
                           "out of SRC") from None


def files_under(folder: Path) -> list[Path]:
    """Every file below `folder` (hidden ones skipped), in sorted order."""
    found = []
    for root, dirs, files in os.walk(folder, onerror=_unreadable_folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return found


def subfolders(folder: Path) -> list[Path]:
    """The folders directly inside `folder` (hidden ones skipped), sorted."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        _unreadable_folder(exc)
        raise  # not reached


def tree_part(
    part_dir: Path, root: Path, classes: list[str], classes_file: str | None, need_all: bool
) -> list[Item]:
    """The Items of `part_dir`/<class>/...; with `need_all`, every class must have a folder."""
    class_dirs = subfolders(part_dir)
    items, seen = [], set()
    for class_dir in class_dirs:
        label = class_index(classes, class_dir.name, str(class_dir), classes_file)
        files = files_under(class_dir)
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


def read_list(list_path: Path, classes: list[str] | None, classes_file: str | None) -> list[tuple[str, str, str]]:
    """(path, class name, "file:line") of each line of a file list; names checked against `classes`."""
    entries = read_pairs(list_path, "file list", "<path> <class name>", "check the path")
    if classes is not None:
        for _path, name, where in entries:
            class_index(classes, name, where, classes_file)
    return entries


def list_items(
    list_path: Path, entries: list[tuple[str, str, str]], classes: list[str], prefix: str = ""
) -> list[Item]:
    """The Items of `read_list`'s entries, paths relative to the list's folder."""
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


def refuse_duplicates(items: list[Item]) -> None:
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


