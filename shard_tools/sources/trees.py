"""Folder trees (ImageNet-style `<class>/<image>`, optionally under train/ and val/) and file lists."""

from __future__ import annotations

from pathlib import Path

from shard_tools.format import ShardFormatError
from shard_tools.sources.base import (
    Collection,
    check_class_names,
    list_items,
    read_classes_file,
    read_list,
    subfolders,
    tree_part,
)


def load_tree(root: Path, classes_file: str | None) -> Collection:
    """A class tree: `root`/<class>/..., or `root`/train/<class>/... with `root`/val/<class>/... beside it."""
    train_dir = root / "train" if (root / "train").is_dir() else root
    val_dir = root / "val" if train_dir != root and (root / "val").is_dir() else None
    if classes_file:
        classes = read_classes_file(classes_file)
    else:
        classes = [p.name for p in subfolders(train_dir)]
        check_class_names(classes, str(train_dir))
        if not classes:
            raise ShardFormatError(f"{train_dir}: no class folders; expected {train_dir}/<class>/<image files>")
    train = tree_part(train_dir, root, classes, classes_file, need_all=True)
    val = tree_part(val_dir, root, classes, classes_file, need_all=False) if val_dir else None
    stray = [p for p in train_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    skipped = [{"path": p.relative_to(root).as_posix(), "reason": "not inside a class folder"} for p in sorted(stray)]
    return Collection(f"tree {root}", classes, train, val, 0.1, skipped)


def load_list(list_path: Path, classes_file: str | None) -> Collection:
    """A file list of `<path> <class name>` lines; classes from `classes_file` or the names it uses, sorted."""
    fixed = read_classes_file(classes_file) if classes_file else None
    entries = read_list(list_path, fixed, classes_file)
    classes = fixed or check_class_names(sorted({name for _, name, _ in entries}), str(list_path))
    present = {name for _, name, _ in entries}
    missing = [name for name in classes if name not in present]
    if missing:
        raise ShardFormatError(f"{list_path}: class {missing[0]!r} has no image in the list; add some")
    train = list_items(list_path, entries, classes)
    return Collection(f"list {list_path}", classes, train, None, 0.1)
