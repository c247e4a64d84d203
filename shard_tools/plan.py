"""From checked images to a shard plan (which image goes to which shard, in which order), and the
set-level files written once every shard is done (labels.txt, train-classes.txt, manifest.json)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from shard_tools.files import atomic_write
from shard_tools.format import (
    LABELS_NAME,
    MANIFEST_NAME,
    NO_LABEL,
    SPLITS,
    TRAIN_CLASSES_NAME,
    TRAIN_LABELED,
    TRAIN_UNLABELED,
    VAL,
    ShardFormatError,
    shard_name,
)
from shard_tools.imaging import DEFAULT_MAX_PIXELS, target_size
from shard_tools.manifest import Manifest, SplitInfo
from shard_tools.sources import Collection, Item
from shard_tools.sources.archive_files import ArchiveMember
from shard_tools.split import choose_labeled, holdout, match_labels_file, read_labels_file, shuffled

SPLIT_CODE = {TRAIN_LABELED: 1, TRAIN_UNLABELED: 2, VAL: 3}
_TAR_BLOCK = 512


@dataclass
class PlannedSample:
    key: str
    written_label: int  # the `.cls`/`.lbl` value: the class, or NO_LABEL in unlabeled shards
    origin: str
    path: str | ArchiveMember | None
    data: bytes | None
    size: tuple[int, int]  # original (width, height)


@dataclass
class ShardTask:
    out_dir: str
    name: str
    split: str
    samples: list[PlannedSample]
    max_side: int | None
    quality: int
    plan_hash: str = ""
    max_pixels: int = DEFAULT_MAX_PIXELS  # the input cap (refused images are skipped, never decoded)


@dataclass
class PackPlan:
    classes: list[str]
    tasks: list[ShardTask]
    labeled: list[tuple[str, int]]  # (key, class) of every labeled training sample
    train: list[tuple[str, int]]  # (key, class) of every training sample, labeled or not
    skipped: list[dict]
    label_split: dict
    val_split: dict
    pack_args: dict
    description: str
    split_counts: dict[str, int] = field(default_factory=dict)


def tool_version() -> str:
    try:
        return metadata.version("mt-scale")
    except metadata.PackageNotFoundError:
        return "unknown"


def _estimated_bytes(scan: tuple, max_side: int | None) -> int:
    """Tar bytes one sample will take; exact for images kept as they are, estimated for re-encoded ones."""
    _, width, height, keep, file_bytes = scan
    new_w, new_h = target_size(width, height, max_side)
    if keep and (new_w, new_h) == (width, height):
        image = file_bytes
    elif keep:
        image = int(file_bytes * (new_w * new_h) / (width * height))
    else:
        image = new_w * new_h // 4  # about 2 bits per pixel for a quality-90 JPEG
    return sample_tar_bytes(image)


def sample_tar_bytes(image_bytes: int) -> int:
    """Tar bytes of one sample whose JPEG is `image_bytes` long: four members (jpg, cls, lbl, json), each a
    512-byte header plus data padded to 512 bytes (cls, lbl and json fit one block each)."""
    return 4 * _TAR_BLOCK + -(-image_bytes // _TAR_BLOCK) * _TAR_BLOCK + 3 * _TAR_BLOCK


def cut_into_shards(entries: list, sizes: list[int], shard_size: int, shard_bytes: int | None) -> list[list]:
    chunks: list[list] = []
    current: list = []
    current_bytes = 0
    for entry, size in zip(entries, sizes, strict=True):
        if current and (len(current) >= shard_size or (shard_bytes and current_bytes + size > shard_bytes)):
            chunks.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += size
    if current:
        chunks.append(current)
    return chunks


def _location(path: str | ArchiveMember) -> str | list:
    """Where a sample's bytes are, as the plan hash records it (an archive member as [archive, offset, size])."""
    return [path.archive, path.offset, path.size] if isinstance(path, ArchiveMember) else path


def _plan_hash(task: ShardTask) -> str:
    description = [task.name, task.max_side, task.quality]
    for s in task.samples:
        content = hashlib.sha1(s.data).hexdigest() if s.data is not None else _location(s.path)
        description.append([s.key, s.written_label, s.origin, content, list(s.size)])
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()


def _labeled_indices(collection: Collection, train: list, labels: list[int], pack_args: dict, labels_file) -> tuple:
    classes = collection.classes
    if labels_file is not None:
        entries = read_labels_file(labels_file, classes)
        try:
            chosen = match_labels_file(entries, [i.key for i, _ in train], [i.origin for i, _ in train], labels)
        except ShardFormatError as exc:
            raise ShardFormatError(f"{exc} (held-out val images and unreadable files cannot be labeled)") from None
        return chosen, {"method": "file", "file": str(Path(labels_file).resolve())}
    chosen = choose_labeled(
        labels, len(classes), labels_per_class=pack_args["labels_per_class"],
        label_fraction=pack_args["label_fraction"], seed=pack_args["seed"], class_names=classes,
    )
    if pack_args["labels_per_class"] is not None:
        how = {"method": "labels_per_class", "labels_per_class": pack_args["labels_per_class"]}
    elif pack_args["label_fraction"] is not None:
        how = {"method": "fraction", "fraction": pack_args["label_fraction"]}
    else:
        how = {"method": "all"}
    return chosen, how


def make_plan(collection: Collection, scans: list[tuple], pack_args: dict, *, labels_file, out_dir: Path) -> PackPlan:
    """Choose val, labeled and order; cut the splits into shards. Raises before anything is written."""
    seed, classes = pack_args["seed"], collection.classes
    n_train = len(collection.train)
    checked = list(zip(collection.train + (collection.val or []), scans, strict=True))
    skipped = list(collection.skipped)
    skipped += [{"path": item.origin, "reason": scan[0]} for item, scan in checked if scan[0] is not None]
    # Key order, so a re-split (which only knows keys) chooses and orders exactly as pack does.
    train = sorted(((item, scan) for item, scan in checked[:n_train] if scan[0] is None), key=lambda e: e[0].key)
    val = sorted(((item, scan) for item, scan in checked[n_train:] if scan[0] is None), key=lambda e: e[0].key)

    if collection.val is not None:
        if pack_args["val_fraction"] is not None:
            raise ShardFormatError(f"{collection.description}: has its own val part; drop --val-fraction")
        method = collection.val_method or ("folder" if collection.description.startswith("tree") else "list")
        val_split = {"method": method}
    else:
        fraction = pack_args["val_fraction"]
        fraction = collection.default_val_fraction if fraction is None else float(fraction)
        keep, held = holdout([item.label for item, _ in train], len(classes), fraction, seed)
        train, val = [train[i] for i in keep], [train[i] for i in held]
        val_split = {"method": "fraction", "fraction": fraction, "seed": seed} if fraction else {"method": "none"}

    labels = [item.label for item, _ in train]
    for index, name in enumerate(classes):
        if index not in labels:
            raise ShardFormatError(f"{collection.description}: class {name!r} has no readable training image; add some")
    chosen, label_split = _labeled_indices(collection, train, labels, pack_args, labels_file)
    label_split["seed"] = seed
    chosen_set = set(chosen)
    parts = {
        TRAIN_LABELED: [(train[i], train[i][0].label) for i in chosen],
        TRAIN_UNLABELED: [(train[i], NO_LABEL) for i in range(len(train)) if i not in chosen_set],
        VAL: [(entry, entry[0].label) for entry in val],
    }
    tasks = []
    for split, entries in parts.items():
        entries = [entries[i] for i in shuffled(len(entries), seed, SPLIT_CODE[split])]
        sizes = [_estimated_bytes(scan, pack_args["max_side"]) for (_, scan), _ in entries]
        for number, chunk in enumerate(cut_into_shards(entries, sizes, pack_args["shard_size"], pack_args["shard_bytes"])):
            samples = [
                PlannedSample(item.key, label, item.origin, item.path, item.data, (scan[1], scan[2]))
                for (item, scan), label in chunk
            ]
            task = ShardTask(str(out_dir), shard_name(split, number), split, samples,
                             pack_args["max_side"], pack_args["quality"])
            task.plan_hash = _plan_hash(task)
            tasks.append(task)
    labeled_items: list[Item] = [item for (item, _), _ in parts[TRAIN_LABELED]]
    return PackPlan(
        classes=list(classes), tasks=tasks,
        labeled=sorted((item.key, item.label) for item in labeled_items),
        train=sorted((item.key, item.label) for item, _ in train),
        skipped=skipped, label_split=label_split, val_split=val_split, pack_args=pack_args,
        description=collection.description,
        split_counts={split: len(entries) for split, entries in parts.items()},
    )


def write_set_files(out: Path, plan: PackPlan, records: dict[str, dict]) -> Manifest:
    """labels.txt, train-classes.txt and, last, manifest.json (its presence marks a finished set)."""
    skipped = list(plan.skipped)
    lost: set[str] = set()
    splits = {name: SplitInfo() for name in SPLITS}
    for task in plan.tasks:
        record = records[task.name]
        for entry in record["skipped"]:
            skipped.append({"path": entry["path"], "reason": entry["reason"]})
            lost.add(entry["key"])
        if record["count"]:
            info = splits[task.split]
            info.shards.append(task.name)
            info.counts.append(record["count"])
            info.sha256.append(record["sha256"])
            info.bytes.append(record["bytes"])
    labeled = [(key, label) for key, label in plan.labeled if key not in lost]
    train = [(key, label) for key, label in plan.train if key not in lost]
    atomic_write(out / LABELS_NAME, "".join(f"{key} {plan.classes[label]}\n" for key, label in labeled))
    atomic_write(out / TRAIN_CLASSES_NAME, "".join(f"{key} {plan.classes[label]}\n" for key, label in train))
    per_class = [0] * len(plan.classes)
    for _, label in labeled:
        per_class[label] += 1
    manifest = Manifest(
        classes=plan.classes,
        splits={name: info for name, info in splits.items() if info.shards},
        label_split={**plan.label_split, "labeled_per_class": per_class},
        image={"max_side": plan.pack_args["max_side"], "quality": plan.pack_args["quality"],
               **({"max_pixels": plan.pack_args["max_pixels"]} if "max_pixels" in plan.pack_args else {})},
        skipped=skipped,
        tool_version=tool_version(),
        source=plan.pack_args["source"],
        val_split=plan.val_split,
        pack_args=plan.pack_args,
    )
    atomic_write(out / MANIFEST_NAME, manifest.to_json())
    return manifest
