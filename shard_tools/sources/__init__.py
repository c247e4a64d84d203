"""Image collections mt-shard can pack, and `load_source`, which tells them apart.

- base: what every source becomes (`Collection` of `Item`s, keys) and the readers sources share.
- trees: ImageNet-style folder trees and `<path> <class name>` file lists.
- digits: scikit-learn's digits, the demo's data.
- ilsvrc: the ILSVRC2012 train and val archives, read in place; cifar: cifar-10-binary.tar.gz.
- archive_files: finding and reading the files inside an archive without extracting it.
"""

from __future__ import annotations

from pathlib import Path

from shard_tools.format import ShardFormatError
from shard_tools.sources.archive_files import archive_layout, is_archive
from shard_tools.sources.base import (
    Collection,
    Item,
    assign_unique_keys,
    key_for,
    list_items,
    read_list,
    refuse_duplicates,
    tree_part,
)
from shard_tools.sources.cifar import CIFAR_META, load_cifar
from shard_tools.sources.digits import DIGITS, digits_collection
from shard_tools.sources.ilsvrc import flat_archive_val, flat_folder_val, load_ilsvrc_train
from shard_tools.sources.trees import load_list, load_tree

__all__ = ["DIGITS", "Collection", "Item", "attach_val", "key_for", "load_archive", "load_source"]


def load_source(source: str | Path, classes_file: str | None = None, val_list: str | None = None,
                val_labels: str | None = None, progress: bool = False) -> Collection:
    """Find every image of `source` (a folder tree, a list file, an archive or "digits") and its class.

    `val_list` is the val source (`--val`: a tree, a list, or a flat archive or folder with `val_labels`).
    """
    if str(source) == DIGITS:
        if classes_file or val_list or val_labels:
            raise ShardFormatError("digits: --classes and --val apply only to folder trees, file lists and archives")
        return digits_collection()
    path = Path(source)
    if path.is_file() and is_archive(path):
        collection = load_archive(path, classes_file, progress)
    elif path.is_dir():
        collection = load_tree(path, classes_file)
    elif path.is_file():
        collection = load_list(path, classes_file)
    else:
        raise ShardFormatError(f"{path}: no such folder or file list; give an image tree, a list file, an archive "
                              "or 'digits'")
    if val_list or val_labels:
        attach_val(collection, val_list, val_labels, classes_file)
    refuse_duplicates([item for item in collection.train + (collection.val or []) if isinstance(item.path, str)])
    unique = assign_unique_keys(collection.train + (collection.val or []))
    collection.train, rest = unique[: len(collection.train)], unique[len(collection.train) :]
    collection.val = rest if collection.val is not None else None
    return collection


def load_archive(path: Path, classes_file: str | None, progress: bool = False) -> Collection:
    """The Collection of a train archive: ILSVRC2012_img_train.tar or cifar-10-binary.tar.gz."""
    layout = archive_layout(path)
    if layout == "cifar-binary":
        if classes_file:
            raise ShardFormatError(f"{path}: CIFAR's classes come from {CIFAR_META}; drop --classes")
        return load_cifar(path)
    if layout == "flat":
        raise ShardFormatError(f"{path}: holds images, not one <wnid>.tar per class; give it as --val "
                               "(with --val-labels) beside the train archive")
    return load_ilsvrc_train(path, classes_file, progress)


def attach_val(collection: Collection, val: str | None, val_labels: str | None, classes_file: str | None) -> None:
    """Give `collection` the val part `--val` names (with `--val-labels` for a flat archive or folder)."""
    if val is None:
        raise ShardFormatError("--val-labels names the classes of --val images; add --val")
    if collection.val is not None:
        raise ShardFormatError(f"{collection.description.split(' ', 1)[-1]}: has its own val part; drop --val")
    if val_labels is not None and not Path(val_labels).is_file():
        raise ShardFormatError(f"{val_labels}: no such val labels file; check --val-labels")
    collection.val, collection.val_method = _load_val(Path(val), val_labels, collection.classes, classes_file)


def _load_val(
    val: Path, val_labels: str | None, classes: list[str], classes_file: str | None
) -> tuple[list[Item], str]:
    """The val Items of `--val` and how they were found ('archive', 'folder' or 'list')."""
    if val.is_file() and is_archive(val):
        if archive_layout(val) != "flat":
            raise ShardFormatError(f"{val}: not a flat archive of val images; give ILSVRC2012_img_val.tar to --val")
        if not val_labels:
            raise ShardFormatError(f"{val}: a val archive names no classes; add --val-labels FILE (a "
                                   "'<file name> <wnid>' list, LOC_val_solution.csv or ILSVRC2012_devkit_t12.tar.gz)")
        return flat_archive_val(val, Path(val_labels), classes), "archive"
    if val.is_dir() and val_labels:  # a flat folder of val images, e.g. the extracted val archive
        return flat_folder_val(val, Path(val_labels), classes), "folder"
    if val_labels:
        raise ShardFormatError(f"{val}: --val-labels applies to a flat val archive or folder; a list or a class "
                               "tree names each image's class itself")
    if val.is_dir():
        items = tree_part(val, val, classes, classes_file, need_all=False)
        return [Item(key_for("val/" + item.origin), item.label, item.origin, item.path) for item in items], "folder"
    if val.is_file():
        return list_items(val, read_list(val, classes, classes_file), classes, prefix="val/"), "list"
    raise ShardFormatError(f"{val}: no such val folder, file list or archive; check --val")
