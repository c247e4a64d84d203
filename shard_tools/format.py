"""The shard set format: the one place both packing and loading read it from.

A shard set is a folder holding `manifest.json`, `labels.txt` and tar shards
(`train-labeled-NNNNNN.tar`, `train-unlabeled-NNNNNN.tar`, `val-NNNNNN.tar`), each with a DALI
index (`.idx`, the `wds2idx` format). Each sample in a tar is a group of members sharing a key:

- `<key>.jpg`  JPEG bytes
- `<key>.cls`  ASCII class index; `-1` in unlabeled shards (the label mask)
- `<key>.lbl`  the same class index as 4 bytes little-endian int32, so DALI reads it with no callback
- `<key>.json` optional: source path and original size

Keys hold no dots and are unique across the whole set; a training key does not change when the
set is re-split, so one image keeps its key whether it is labeled or not.
"""

from __future__ import annotations

import json
import re
import struct
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shard_tools.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.txt"
# Every training key with its true class, labeled or not: a re-split reads classes from here, so
# the unlabeled shards themselves never carry a label.
TRAIN_CLASSES_NAME = "train-classes.txt"
INDEX_VERSION = "v1.2"  # the DALI wds2idx index format version written beside each shard

TRAIN_LABELED = "train-labeled"
TRAIN_UNLABELED = "train-unlabeled"
VAL = "val"
SPLITS = (TRAIN_LABELED, TRAIN_UNLABELED, VAL)

IMAGE_EXT = "jpg"
CLASS_EXT = "cls"
LABEL_EXT = "lbl"
META_EXT = "json"
SAMPLE_EXTS = (IMAGE_EXT, CLASS_EXT, LABEL_EXT)
NO_LABEL = -1


class ShardFormatError(UserError):
    """A shard set that cannot be read as one; the message names the file and the fix."""


_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


def is_valid_key(key: str) -> bool:
    """Keys hold no dots (webdataset splits member names at the first dot) and no path parts."""
    return bool(_KEY_PATTERN.match(key)) and len(key) <= 90


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_name(shard: str) -> str:
    """The DALI index file that sits beside a shard."""
    return shard[:-4] + ".idx" if shard.endswith(".tar") else shard + ".idx"


def build_index(tar_path: str | Path) -> str:
    """The DALI index text of a shard, as `wds2idx` writes it.

    First line `v1.2 <samples>`, then one line per sample listing each component as
    `<ext> <data offset> <size> <member name>`; members sharing a key are one sample.
    """
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as archive:
        for member in archive:
            if not member.isfile():
                continue
            # Split as wds2idx does: the extension starts at the first dot of the file name.
            dot = member.name.find(".", member.name.rfind("/") + 1)
            key, ext = member.name[:dot], member.name[dot + 1 :]
            if dot < 0 or not key or key.endswith("/"):
                continue
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if key != last_key:
                samples.append([entry])
                last_key = key
            else:
                samples[-1].append(entry)
    if not samples:
        raise ShardFormatError(f"{tar_path}: holds no samples; re-pack the set with mt-shard pack")
    return f"{INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(sample) + "\n" for sample in samples)


def parse_index(text: str, path: str = "index") -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Samples of a DALI index: (key, {ext: (data offset, size)}) in tar order."""
    lines = text.splitlines()
    try:
        version, count = lines[0].split()
        samples = []
        for line in lines[1:]:
            fields = line.split()
            components = {}
            for start in range(0, len(fields), 4):
                ext, offset, size, name = fields[start : start + 4]
                components[ext] = (int(offset), int(size))
            samples.append((name[: len(name) - len(ext) - 1], components))
    except (IndexError, ValueError):
        raise ShardFormatError(f"{path}: not a DALI webdataset index; re-pack the set") from None
    if version != INDEX_VERSION or int(count) != len(samples):
        raise ShardFormatError(f"{path}: index header {lines[0]!r} does not match its {len(samples)} lines")
    return samples


def encode_label(label: int) -> bytes:
    return struct.pack("<i", int(label))


def decode_label(raw: bytes) -> int:
    return struct.unpack("<i", raw)[0]


def encode_class(label: int) -> bytes:
    return str(int(label)).encode("ascii")


def decode_class(raw: bytes) -> int:
    return int(raw.decode("ascii").strip())


@dataclass
class SplitInfo:
    shards: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts))


@dataclass
class Manifest:
    classes: list[str]
    splits: dict[str, SplitInfo]
    label_split: dict  # how labels were chosen: {"method", "seed", "labels_per_class"|"fraction"|"file"}
    image: dict  # {"max_side", "quality"}
    skipped: list[dict] = field(default_factory=list)  # [{"path", "reason"}]
    tool_version: str = ""
    format_version: int = FORMAT_VERSION
    source: str = ""
    val_split: dict = field(default_factory=dict)  # {"method": "folder"|"fraction"|"none", "fraction", "seed"}
    pack_args: dict = field(default_factory=dict)  # the options that made the set (resume checks them)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        return self.splits.get(name) or SplitInfo()

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict, path: str = MANIFEST_NAME) -> Manifest:
        try:
            version = int(data["format_version"])
            if version > FORMAT_VERSION:
                raise ShardFormatError(
                    f"{path}: format version {version} is newer than this mt-scale reads "
                    f"({FORMAT_VERSION}); upgrade mt-scale"
                )
            splits = {name: SplitInfo(**info) for name, info in data["splits"].items()}
            return cls(
                classes=list(data["classes"]),
                splits=splits,
                label_split=dict(data["label_split"]),
                image=dict(data["image"]),
                skipped=list(data.get("skipped", [])),
                tool_version=data.get("tool_version", ""),
                format_version=version,
                source=data.get("source", ""),
                val_split=dict(data.get("val_split", {})),
                pack_args=dict(data.get("pack_args", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardFormatError(
                f"{path}: not a valid mt-scale manifest ({exc!r}); re-pack the set with mt-shard pack"
            ) from None


def read_manifest(shard_dir: str | Path) -> Manifest:
    path = Path(shard_dir) / MANIFEST_NAME
    if not Path(shard_dir).is_dir():
        raise ShardFormatError(f"{shard_dir}: no such shard set folder; pack one with mt-shard pack")
    if not path.is_file():
        raise ShardFormatError(f"{path}: missing; this folder is not a shard set (pack one with mt-shard pack)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardFormatError(f"{path}: unreadable manifest ({exc}); re-pack the set") from None
    return Manifest.from_dict(data, str(path))


def shard_paths(shard_dir: str | Path, split: str) -> list[str]:
    """Absolute paths of a split's shards, in manifest order."""
    manifest = read_manifest(shard_dir)
    return [str(Path(shard_dir) / name) for name in manifest.split(split).shards]
