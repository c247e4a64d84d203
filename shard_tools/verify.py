"""`mt-shard verify`: check a shard set (a folder or an s3:// prefix) against its manifest and name
every problem found.

Checks: the manifest's fields (a shard name that is not a plain shard file name is refused
outright: it could point outside the set), each shard's sha256 and sample count, its DALI index
against the tar, keys (dot-free, unique across the set, every sample complete), labels (`.cls`
equals `.lbl`, in range, -1 in every unlabeled shard and only there), labels.txt and
train-classes.txt (well-formed, and against the shards), no stray shard or other unexpected file;
with `decode`, every image decodes as a JPEG within the set's pixel cap (checked from its header).
Each shard is read once, start to end (in object storage: one streamed GET): its sha256, its members
and the index it should have all come from that one pass.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shard_tools import storage
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
    decode_class,
    decode_label,
    index_name,
    index_text,
    is_valid_key,
    shown,
)
from shard_tools.manifest import (
    Manifest,
    manifest_path,
    manifest_problems,
    parse_key_classes,
    read_manifest_data,
)

_MAX_SMALL_MEMBER = 1 << 20  # .cls, .lbl and .json members are a few bytes; a larger one is not read
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


def read_key_classes(path: Path) -> dict[str, str]:
    """`<key> <class name>` lines (labels.txt, train-classes.txt) as a dict; damaged lines are left out
    (parse_key_classes names them)."""
    return parse_key_classes(path)[0]


def check_decode(raw: bytes, max_pixels: int | None = None) -> str | None:
    """Why a `.jpg` member is unusable (not JPEG, over the pixel cap, does not decode), or None.

    The cap (default: PIL's, DEFAULT_MAX_PIXELS) is checked from the header by the same function pack
    uses, before any pixel is decoded.
    """
    # OpenCV and PIL load only when images are decoded (verify --decode)
    from shard_tools.imaging import DEFAULT_MAX_PIXELS, BadImage, open_image

    try:
        image = open_image(raw, DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
        if image.format != "JPEG":
            return f"is {image.format}, not JPEG"
        image.load()
    except BadImage as exc:
        return str(exc) if str(exc).startswith("too large") else f"does not decode ({exc})"
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the finding itself
        return f"does not decode ({exc})"
    return None


class _HashingReader:
    """A read-once file object over a stream of chunks that hashes and counts every byte handed out."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._buffer = chunks, b""
        self.digest, self.size = hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            block = next(self._chunks, b"")
            if not block:
                break
            self._buffer += block
        cut = len(self._buffer) if size < 0 else size
        data, self._buffer = self._buffer[:cut], self._buffer[cut:]
        self.digest.update(data)
        self.size += len(data)
        return data

    def drain(self) -> str:
        """Read what is left; the sha256 of the whole stream."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


@dataclass
class _ShardScan:
    """What one pass over a shard found."""

    sha256: str = ""
    problems: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    unreadable: str | None = None  # why the tar could not be read, when it could not
    index: str | None = None  # the DALI index the tar should have
    index_error: str | None = None  # why there is none


def _scan_shard(url: str, name: str, split: str, num_classes: int, decode: bool, max_pixels: int | None) -> _ShardScan:
    """Read the shard at `url` once: sha256, per-member checks and its expected index in the same pass."""
    scan = _ShardScan()
    reader = _HashingReader(storage.stream(url))
    try:
        with tarfile.open(fileobj=reader, mode="r|", bufsize=1 << 20) as archive:
            members: list[tarfile.TarInfo] = []
            scan.problems, scan.labels = _check_shard(archive, members, name, split, num_classes, decode, max_pixels)
        try:
            scan.index = index_text(members, url)
        except ShardFormatError as exc:
            scan.index_error = f"{name}: unreadable tar ({exc})"
    except _TAR_ERRORS as exc:
        scan.unreadable = f"{name}: unreadable tar ({exc})"
    scan.sha256 = reader.drain()
    return scan


def _check_shard(archive: tarfile.TarFile, members: list[tarfile.TarInfo], name: str, split: str, num_classes: int,
                 decode: bool, max_pixels: int | None) -> tuple[list[str], dict[str, int]]:
    """Problems in one tar read in order (each member is appended to `members`), and its samples' labels."""
    problems: list[str] = []
    parts_by_key: dict[str, dict[str, bytes]] = defaultdict(dict)
    order: list[str] = []
    for member in archive:
        members.append(member)
        if not member.isfile():
            problems.append(f"{name}: {shown(member.name)} is not a regular file")
            continue
        key, _, ext = member.name.partition(".")
        if key not in parts_by_key:
            order.append(key)
        elif order[-1] != key:
            problems.append(f"{name}: members of {shown(key)} are not contiguous")
        if ext == IMAGE_EXT and not decode:
            parts_by_key[key][ext] = b""  # present; the sha256 already vouches for the bytes
        elif ext != IMAGE_EXT and member.size > _MAX_SMALL_MEMBER:
            problems.append(f"{name}: member {shown(member.name)} is {member.size} bytes, far too large")
            parts_by_key[key][ext] = b""
        else:
            parts_by_key[key][ext] = archive.extractfile(member).read()
    labels: dict[str, int] = {}
    for key in order:
        parts = parts_by_key[key]
        sample = key if is_valid_key(key) else repr(key)  # quoted in every message when not a valid key
        if sample != key:
            problems.append(f"{name}: key {sample} is not a valid key (letters, digits, '_', '-' only)")
        missing = [ext for ext in SAMPLE_EXTS if ext not in parts]
        if missing:
            problems.append(f"{name}: sample {sample} lacks {', '.join('.' + e for e in missing)}")
            continue
        try:
            cls, lbl = decode_class(parts[CLASS_EXT]), decode_label(parts[LABEL_EXT])
        except Exception as exc:  # noqa: BLE001 - a malformed label is the finding itself
            problems.append(f"{name}: sample {sample} has an unreadable label ({exc})")
            continue
        if cls != lbl:
            problems.append(f"{name}: sample {sample} has .cls {cls} but .lbl {lbl}")
        if split == TRAIN_UNLABELED and cls != NO_LABEL:
            problems.append(f"{name}: unlabeled sample {sample} carries label {cls} (must be {NO_LABEL})")
        if split != TRAIN_UNLABELED and not 0 <= cls < num_classes:
            problems.append(f"{name}: sample {sample} has label {cls}, outside 0..{num_classes - 1}")
        if decode and (reason := check_decode(parts[IMAGE_EXT], max_pixels)):
            problems.append(f"{name}: image {sample} {reason}")
        labels[key] = cls
    return problems, labels


def _check_label_files(files: _SetFiles, classes: list[str], labels_by_split: dict[str, dict[str, int]]) -> list[str]:
    problems = []
    labeled = {key: classes[label] for key, label in labels_by_split[TRAIN_LABELED].items() if 0 <= label < len(classes)}
    if files.size(LABELS_NAME) is None:
        problems.append(f"{LABELS_NAME}: missing")
    else:
        listed, damaged = parse_key_classes(files.path(LABELS_NAME), classes)
        problems += damaged
        if listed != labeled:
            wrong = sorted(set(listed.items()) ^ set(labeled.items()))
            example = f", e.g. {wrong[0][0]}" if wrong else ""
            problems.append(f"{LABELS_NAME}: disagrees with the labeled shards ({len(wrong)} lines differ{example})")
    if files.size(TRAIN_CLASSES_NAME) is None:
        problems.append(f"{TRAIN_CLASSES_NAME}: missing")
        return problems
    truth, damaged = parse_key_classes(files.path(TRAIN_CLASSES_NAME), classes)
    problems += damaged
    train_keys = set(labels_by_split[TRAIN_LABELED]) | set(labels_by_split[TRAIN_UNLABELED])
    if set(truth) != train_keys:
        problems.append(f"{TRAIN_CLASSES_NAME}: lists {len(truth)} keys but the training shards hold {len(train_keys)}")
    mismatched = [key for key, name in labeled.items() if truth.get(key, name) != name]
    if mismatched:
        problems.append(f"{TRAIN_CLASSES_NAME}: class of labeled sample {mismatched[0]} disagrees with its shard")
    return problems


class _SetFiles:
    """What a set's folder (or s3:// prefix) holds: the sizes of its files (one listing in object storage)."""

    def __init__(self, base: str) -> None:
        self.base, self.remote = base, storage.is_remote(base)
        if self.remote:
            listing = _s3_listing(base)
            self.sizes = {name: size for name, size in listing.items() if "/" not in name}
            self._others = sorted(listing.keys() - self.sizes.keys())
        else:
            self.sizes = {}
            self._others = []

    def path(self, name: str) -> str:
        return storage.join(self.base, name) if self.remote else str(Path(self.base) / name)

    def size(self, name: str) -> int | None:
        """Bytes in the file `name`, or None when it is not there (or not a file)."""
        if self.remote:
            return self.sizes.get(name)
        path = Path(self.base) / name
        return path.stat().st_size if path.is_file() else None

    def unexpected(self, listed: set[str]) -> list[str]:
        """Anything in the folder (prefix) that is not part of the set: stray shards, leftovers, other files."""
        expected = {MANIFEST_NAME, LABELS_NAME, TRAIN_CLASSES_NAME} | listed | {index_name(name) for name in listed}
        problems = []
        if self.remote:
            fix = "(not written by mt-shard); delete {}, or push the set to a prefix of its own"
            for name in sorted(set(self.sizes) - expected):
                shown_name = shown(name)
                problems.append(f"{shown_name}: a shard not in the manifest (left from another push?)"
                                if name.endswith(".tar")
                                else f"{shown_name}: an unexpected object under the prefix {fix.format('it')}")
            folders = sorted({name.split("/", 1)[0] for name in self._others})
            problems += [f"{shown(folder)}/: unexpected objects under the prefix {fix.format('them')}" for folder in folders]
            return problems
        for entry in sorted(Path(self.base).iterdir()):
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


def _s3_listing(base: str) -> dict[str, int]:
    from shard_tools import s3

    return s3.list_sizes(base)


def _listed_names(data: dict) -> set[str]:
    splits = data.get("splits")
    names = set()
    for info in splits.values() if isinstance(splits, dict) else ():
        shards = info.get("shards") if isinstance(info, dict) else None
        names.update(name for name in (shards if isinstance(shards, list) else ()) if isinstance(name, str))
    return names


def verify(shard_dir: str | Path, decode: bool = False, progress: bool = False) -> list[str]:
    """Every problem found in the set (a folder or an s3://bucket/prefix URL); empty when it is sound.

    Raises ShardFormatError when there is no readable manifest, or when it names a shard that is
    not a plain shard file name: such a set is not checked further, only refused.
    """
    from tqdm import tqdm

    base = str(shard_dir)
    data = read_manifest_data(base)
    files = _SetFiles(base)
    damaged = manifest_problems(data)
    if damaged:  # the shards cannot be checked against a manifest that is itself damaged
        return [f"{MANIFEST_NAME}: {problem}" for problem in damaged] + files.unexpected(_listed_names(data))
    manifest = Manifest.from_dict(data, manifest_path(base))
    max_pixels = manifest.image.get("max_pixels")
    problems: list[str] = []
    seen: dict[str, str] = {}
    labels_by_split: dict[str, dict[str, int]] = {name: {} for name in SPLITS}
    shards = [(split, i, name) for split in SPLITS for i, name in enumerate(manifest.split(split).shards)]
    for split, position, name in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        info = manifest.split(split)
        size = files.size(name)
        if size is None:
            problems.append(f"{name}: missing")
            continue
        if info.bytes and size != info.bytes[position]:
            problems.append(f"{name}: {size} bytes, the manifest says {info.bytes[position]}")
        scan = _scan_shard(files.path(name), name, split, manifest.num_classes, decode, max_pixels)
        if scan.sha256 != info.sha256[position]:
            problems.append(f"{name}: sha256 differs from the manifest (the file changed or is damaged)")
        if scan.unreadable:
            problems.append(scan.unreadable)
            continue
        problems.extend(scan.problems)
        if len(scan.labels) != info.counts[position]:
            problems.append(f"{name}: holds {len(scan.labels)} samples, the manifest says {info.counts[position]}")
        for key in scan.labels:
            if key in seen:
                problems.append(f"{name}: key {shown(key)} repeats (also in {seen[key]})")
            seen[key] = name
        labels_by_split[split].update(scan.labels)
        idx = index_name(name)
        if files.size(idx) is None:
            problems.append(f"{idx}: missing (DALI needs it)")
        elif scan.index_error:
            problems.append(scan.index_error)
        elif storage.read_bytes(files.path(idx)) != scan.index.encode():
            problems.append(f"{idx}: does not match the tar's members; re-pack or rebuild the index")
    problems.extend(files.unexpected(_listed_names(data)))
    problems.extend(_check_label_files(files, manifest.classes, labels_by_split))
    per_class = [0] * manifest.num_classes
    for label in labels_by_split[TRAIN_LABELED].values():
        if 0 <= label < manifest.num_classes:
            per_class[label] += 1
    stated = manifest.label_split.get("labeled_per_class")
    if stated is not None and stated != per_class:
        problems.append(f"{MANIFEST_NAME}: labeled_per_class {stated} but the labeled shards hold {per_class}")
    return problems
