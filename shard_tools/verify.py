"""`mt-shard verify`: check a shard set against its manifest and name every problem found.

Checks: each shard's sha256 and sample count, its DALI index against the tar, keys (dot-free,
unique across the set, every sample complete), labels (`.cls` equals `.lbl`, in range, -1 in every
unlabeled shard and only there), labels.txt and train-classes.txt against the shards, no stray
shards; with `decode`, every image decodes as a JPEG.
"""

from __future__ import annotations

import io
import tarfile
from collections import defaultdict
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from shard_tools.files import sha256_file
from shard_tools.format import (
    CLASS_EXT,
    IMAGE_EXT,
    LABEL_EXT,
    LABELS_NAME,
    MANIFEST_NAME,
    NO_LABEL,
    SAMPLE_EXTS,
    SPLITS,
    TRAIN_CLASSES_NAME,
    TRAIN_LABELED,
    TRAIN_UNLABELED,
    ShardFormatError,
    build_index,
    decode_class,
    decode_label,
    index_name,
    is_valid_key,
    read_manifest,
)


def read_key_classes(path: Path) -> dict[str, str]:
    """`<key> <class name>` lines (labels.txt, train-classes.txt) as a dict."""
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, name = line.rsplit(None, 1)
            pairs[key] = name
    return pairs


def _check_decode(raw: bytes) -> str | None:
    try:
        image = Image.open(io.BytesIO(raw))
        if image.format != "JPEG":
            return f"is {image.format}, not JPEG"
        image.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the finding itself
        return f"does not decode ({exc})"
    return None


def _check_shard(path: Path, split: str, num_classes: int, decode: bool) -> tuple[list[str], dict[str, int]]:
    """Problems in one tar, and its samples' labels by key."""
    problems: list[str] = []
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    order: list[str] = []
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            if not member.isfile():
                problems.append(f"{path.name}: {member.name} is not a regular file")
                continue
            key, _, ext = member.name.partition(".")
            if key not in members:
                order.append(key)
            elif order[-1] != key:
                problems.append(f"{path.name}: members of {key} are not contiguous")
            if ext == IMAGE_EXT and not decode:
                members[key][ext] = b""  # present; the sha256 already vouches for the bytes
            else:
                members[key][ext] = archive.extractfile(member).read()
    labels: dict[str, int] = {}
    for key in order:
        parts = members[key]
        if not is_valid_key(key):
            problems.append(f"{path.name}: key {key!r} is not a valid key (letters, digits, '_', '-' only)")
        missing = [ext for ext in SAMPLE_EXTS if ext not in parts]
        if missing:
            problems.append(f"{path.name}: sample {key} lacks {', '.join('.' + e for e in missing)}")
            continue
        try:
            cls, lbl = decode_class(parts[CLASS_EXT]), decode_label(parts[LABEL_EXT])
        except Exception as exc:  # noqa: BLE001 - a malformed label is the finding itself
            problems.append(f"{path.name}: sample {key} has an unreadable label ({exc})")
            continue
        if cls != lbl:
            problems.append(f"{path.name}: sample {key} has .cls {cls} but .lbl {lbl}")
        if split == TRAIN_UNLABELED and cls != NO_LABEL:
            problems.append(f"{path.name}: unlabeled sample {key} carries label {cls} (must be {NO_LABEL})")
        if split != TRAIN_UNLABELED and not 0 <= cls < num_classes:
            problems.append(f"{path.name}: sample {key} has label {cls}, outside 0..{num_classes - 1}")
        if decode and (reason := _check_decode(parts[IMAGE_EXT])):
            problems.append(f"{path.name}: image {key} {reason}")
        labels[key] = cls
    return problems, labels


def _check_label_files(folder: Path, classes: list[str], labels_by_split: dict[str, dict[str, int]]) -> list[str]:
    problems = []
    labeled = {key: classes[label] for key, label in labels_by_split[TRAIN_LABELED].items() if 0 <= label < len(classes)}
    listed = read_key_classes(folder / LABELS_NAME) if (folder / LABELS_NAME).exists() else None
    if listed is None:
        problems.append(f"{LABELS_NAME}: missing")
    elif listed != labeled:
        wrong = sorted(set(listed.items()) ^ set(labeled.items()))
        problems.append(f"{LABELS_NAME}: disagrees with the labeled shards ({len(wrong)} lines differ, e.g. {wrong[0][0]})")
    truth_path = folder / TRAIN_CLASSES_NAME
    if not truth_path.exists():
        problems.append(f"{TRAIN_CLASSES_NAME}: missing")
        return problems
    truth = read_key_classes(truth_path)
    train_keys = set(labels_by_split[TRAIN_LABELED]) | set(labels_by_split[TRAIN_UNLABELED])
    if set(truth) != train_keys:
        problems.append(f"{TRAIN_CLASSES_NAME}: lists {len(truth)} keys but the training shards hold {len(train_keys)}")
    unknown = sorted(name for name in set(truth.values()) if name not in classes)
    if unknown:
        problems.append(f"{TRAIN_CLASSES_NAME}: unknown class {unknown[0]!r}")
    mismatched = [key for key, name in labeled.items() if truth.get(key, name) != name]
    if mismatched:
        problems.append(f"{TRAIN_CLASSES_NAME}: class of labeled sample {mismatched[0]} disagrees with its shard")
    return problems


def verify(shard_dir: str | Path, decode: bool = False, progress: bool = False) -> list[str]:
    """Every problem found in the set (empty when it is sound); raises if there is no manifest."""
    folder = Path(shard_dir)
    manifest = read_manifest(folder)
    problems: list[str] = []
    seen: dict[str, str] = {}
    labels_by_split: dict[str, dict[str, int]] = {name: {} for name in SPLITS}
    shards = [(split, i, name) for split in SPLITS for i, name in enumerate(manifest.split(split).shards)]
    for split, position, name in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        info, path = manifest.split(split), folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if sha256_file(path) != info.sha256[position]:
            problems.append(f"{name}: sha256 differs from the manifest (the file changed or is damaged)")
        try:
            shard_problems, labels = _check_shard(path, split, manifest.num_classes, decode)
        except (tarfile.TarError, OSError) as exc:
            problems.append(f"{name}: unreadable tar ({exc})")
            continue
        problems.extend(shard_problems)
        if len(labels) != info.counts[position]:
            problems.append(f"{name}: holds {len(labels)} samples, the manifest says {info.counts[position]}")
        for key in labels:
            if key in seen:
                problems.append(f"{name}: key {key} repeats (also in {seen[key]})")
            seen[key] = name
        labels_by_split[split].update(labels)
        idx = folder / index_name(name)
        try:
            if not idx.is_file():
                problems.append(f"{idx.name}: missing (DALI needs it)")
            elif idx.read_text() != build_index(path):
                problems.append(f"{idx.name}: does not match the tar's members; re-pack or rebuild the index")
        except (ShardFormatError, tarfile.TarError) as exc:
            problems.append(f"{name}: unreadable tar ({exc})")
    listed = {name for split in SPLITS for name in manifest.split(split).shards}
    stray = sorted(p.name for p in folder.glob("*.tar") if p.name not in listed)
    problems.extend(f"{name}: a shard not in the manifest (left from another pack?)" for name in stray)
    problems.extend(_check_label_files(folder, manifest.classes, labels_by_split))
    per_class = [0] * manifest.num_classes
    for label in labels_by_split[TRAIN_LABELED].values():
        if 0 <= label < manifest.num_classes:
            per_class[label] += 1
    stated = manifest.label_split.get("labeled_per_class")
    if stated is not None and stated != per_class:
        problems.append(f"{MANIFEST_NAME}: labeled_per_class {stated} but the labeled shards hold {per_class}")
    return problems
