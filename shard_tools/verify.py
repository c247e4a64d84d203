"""`mt-shard verify`: check a shard set against its manifest and name every problem found.

Checks: the manifest's fields (a shard name that is not a plain shard file name is refused
outright: it could point outside the set), each shard's sha256 and sample count, its DALI index
against the tar, keys (dot-free, unique across the set, every sample complete), labels (`.cls`
equals `.lbl`, in range, -1 in every unlabeled shard and only there), labels.txt and
train-classes.txt (well-formed, and against the shards), no stray shard or other unexpected file;
with `decode`, every image decodes as a JPEG within the set's pixel cap (checked from its header).
"""

from __future__ import annotations

import tarfile
from collections import defaultdict
from pathlib import Path

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
    Manifest,
    ShardFormatError,
    build_index,
    decode_class,
    decode_label,
    index_name,
    is_valid_key,
    manifest_problems,
    parse_key_classes,
    read_manifest_data,
    shown,
)
from shard_tools.imaging import DEFAULT_MAX_PIXELS, BadImage, open_image

_MAX_SMALL_MEMBER = 1 << 20  # .cls, .lbl and .json members are a few bytes; a larger one is not read
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


def read_key_classes(path: Path) -> dict[str, str]:
    """`<key> <class name>` lines (labels.txt, train-classes.txt) as a dict; damaged lines are left out
    (parse_key_classes names them)."""
    return parse_key_classes(path)[0]


def check_decode(raw: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why a `.jpg` member is unusable (not JPEG, over the pixel cap, does not decode), or None.

    The cap is checked from the header by the same function pack uses, before any pixel is decoded.
    """
    try:
        image = open_image(raw, max_pixels)
        if image.format != "JPEG":
            return f"is {image.format}, not JPEG"
        image.load()
    except BadImage as exc:
        return str(exc) if str(exc).startswith("too large") else f"does not decode ({exc})"
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the finding itself
        return f"does not decode ({exc})"
    return None


def _check_shard(path: Path, split: str, num_classes: int, decode: bool, max_pixels: int) -> tuple[list[str], dict[str, int]]:
    """Problems in one tar, and its samples' labels by key."""
    problems: list[str] = []
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    order: list[str] = []
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            if not member.isfile():
                problems.append(f"{path.name}: {shown(member.name)} is not a regular file")
                continue
            key, _, ext = member.name.partition(".")
            if key not in members:
                order.append(key)
            elif order[-1] != key:
                problems.append(f"{path.name}: members of {shown(key)} are not contiguous")
            if ext == IMAGE_EXT and not decode:
                members[key][ext] = b""  # present; the sha256 already vouches for the bytes
            elif ext != IMAGE_EXT and member.size > _MAX_SMALL_MEMBER:
                problems.append(f"{path.name}: member {shown(member.name)} is {member.size} bytes, far too large")
                members[key][ext] = b""
            else:
                members[key][ext] = archive.extractfile(member).read()
    labels: dict[str, int] = {}
    for key in order:
        parts = members[key]
        name = key if is_valid_key(key) else repr(key)  # quoted in every message when not a valid key
        if name != key:
            problems.append(f"{path.name}: key {name} is not a valid key (letters, digits, '_', '-' only)")
        missing = [ext for ext in SAMPLE_EXTS if ext not in parts]
        if missing:
            problems.append(f"{path.name}: sample {name} lacks {', '.join('.' + e for e in missing)}")
            continue
        try:
            cls, lbl = decode_class(parts[CLASS_EXT]), decode_label(parts[LABEL_EXT])
        except Exception as exc:  # noqa: BLE001 - a malformed label is the finding itself
            problems.append(f"{path.name}: sample {name} has an unreadable label ({exc})")
            continue
        if cls != lbl:
            problems.append(f"{path.name}: sample {name} has .cls {cls} but .lbl {lbl}")
        if split == TRAIN_UNLABELED and cls != NO_LABEL:
            problems.append(f"{path.name}: unlabeled sample {name} carries label {cls} (must be {NO_LABEL})")
        if split != TRAIN_UNLABELED and not 0 <= cls < num_classes:
            problems.append(f"{path.name}: sample {name} has label {cls}, outside 0..{num_classes - 1}")
        if decode and (reason := check_decode(parts[IMAGE_EXT], max_pixels)):
            problems.append(f"{path.name}: image {name} {reason}")
        labels[key] = cls
    return problems, labels


def _check_label_files(folder: Path, classes: list[str], labels_by_split: dict[str, dict[str, int]]) -> list[str]:
    problems = []
    labeled = {key: classes[label] for key, label in labels_by_split[TRAIN_LABELED].items() if 0 <= label < len(classes)}
    if not (folder / LABELS_NAME).is_file():
        problems.append(f"{LABELS_NAME}: missing")
    else:
        listed, damaged = parse_key_classes(folder / LABELS_NAME, classes)
        problems += damaged
        if listed != labeled:
            wrong = sorted(set(listed.items()) ^ set(labeled.items()))
            example = f", e.g. {wrong[0][0]}" if wrong else ""
            problems.append(f"{LABELS_NAME}: disagrees with the labeled shards ({len(wrong)} lines differ{example})")
    truth_path = folder / TRAIN_CLASSES_NAME
    if not truth_path.is_file():
        problems.append(f"{TRAIN_CLASSES_NAME}: missing")
        return problems
    truth, damaged = parse_key_classes(truth_path, classes)
    problems += damaged
    train_keys = set(labels_by_split[TRAIN_LABELED]) | set(labels_by_split[TRAIN_UNLABELED])
    if set(truth) != train_keys:
        problems.append(f"{TRAIN_CLASSES_NAME}: lists {len(truth)} keys but the training shards hold {len(train_keys)}")
    mismatched = [key for key, name in labeled.items() if truth.get(key, name) != name]
    if mismatched:
        problems.append(f"{TRAIN_CLASSES_NAME}: class of labeled sample {mismatched[0]} disagrees with its shard")
    return problems


def _unexpected_files(folder: Path, listed: set[str]) -> list[str]:
    """Anything in the folder that is not part of the set: stray shards, leftovers, other files."""
    expected = {MANIFEST_NAME, LABELS_NAME, TRAIN_CLASSES_NAME} | listed | {index_name(name) for name in listed}
    problems = []
    for entry in sorted(folder.iterdir()):
        if entry.name in expected:
            continue
        name = shown(entry.name)
        if entry.name.endswith(".tar"):
            problems.append(f"{name}: a shard not in the manifest (left from another pack?)")
        elif entry.is_dir() and not entry.is_symlink():
            problems.append(f"{name}: an unexpected folder in the set; move it out")
        else:
            problems.append(f"{name}: an unexpected file in the set (not written by mt-shard); move it out")
    return problems


def _listed_names(data: dict) -> set[str]:
    splits = data.get("splits")
    names = set()
    for info in splits.values() if isinstance(splits, dict) else ():
        shards = info.get("shards") if isinstance(info, dict) else None
        names.update(name for name in (shards if isinstance(shards, list) else ()) if isinstance(name, str))
    return names


def verify(shard_dir: str | Path, decode: bool = False, progress: bool = False) -> list[str]:
    """Every problem found in the set (empty when it is sound).

    Raises ShardFormatError when there is no readable manifest, or when it names a shard that is
    not a plain shard file name: such a set is not checked further, only refused.
    """
    folder = Path(shard_dir)
    data = read_manifest_data(folder)
    damaged = manifest_problems(data)
    if damaged:  # the shards cannot be checked against a manifest that is itself damaged
        return [f"{MANIFEST_NAME}: {problem}" for problem in damaged] + _unexpected_files(folder, _listed_names(data))
    manifest = Manifest.from_dict(data, str(folder / MANIFEST_NAME))
    max_pixels = manifest.image.get("max_pixels", DEFAULT_MAX_PIXELS)
    problems: list[str] = []
    seen: dict[str, str] = {}
    labels_by_split: dict[str, dict[str, int]] = {name: {} for name in SPLITS}
    shards = [(split, i, name) for split in SPLITS for i, name in enumerate(manifest.split(split).shards)]
    for split, position, name in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        info, path = manifest.split(split), folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        if info.bytes and path.stat().st_size != info.bytes[position]:
            problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says {info.bytes[position]}")
        if sha256_file(path) != info.sha256[position]:
            problems.append(f"{name}: sha256 differs from the manifest (the file changed or is damaged)")
        try:
            shard_problems, labels = _check_shard(path, split, manifest.num_classes, decode, max_pixels)
        except _TAR_ERRORS as exc:
            problems.append(f"{name}: unreadable tar ({exc})")
            continue
        problems.extend(shard_problems)
        if len(labels) != info.counts[position]:
            problems.append(f"{name}: holds {len(labels)} samples, the manifest says {info.counts[position]}")
        for key in labels:
            if key in seen:
                problems.append(f"{name}: key {shown(key)} repeats (also in {seen[key]})")
            seen[key] = name
        labels_by_split[split].update(labels)
        idx = folder / index_name(name)
        try:
            if not idx.is_file():
                problems.append(f"{idx.name}: missing (DALI needs it)")
            elif idx.read_bytes() != build_index(path).encode():
                problems.append(f"{idx.name}: does not match the tar's members; re-pack or rebuild the index")
        except (ShardFormatError, *_TAR_ERRORS) as exc:
            problems.append(f"{name}: unreadable tar ({exc})")
    problems.extend(_unexpected_files(folder, _listed_names(data)))
    problems.extend(_check_label_files(folder, manifest.classes, labels_by_split))
    per_class = [0] * manifest.num_classes
    for label in labels_by_split[TRAIN_LABELED].values():
        if 0 <= label < manifest.num_classes:
            per_class[label] += 1
    stated = manifest.label_split.get("labeled_per_class")
    if stated is not None and stated != per_class:
        problems.append(f"{MANIFEST_NAME}: labeled_per_class {stated} but the labeled shards hold {per_class}")
    return problems
