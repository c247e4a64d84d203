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

The manifest and the key-class lists are read and checked in shard_tools.manifest.
"""

from __future__ import annotations

import re
import struct
import tarfile
from collections.abc import Iterable
from pathlib import Path

from shard_tools.errors import UserError
from shard_tools.text import plain_or_quoted, quoted

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
# The one pixel cap (width x height) of pack, `verify --decode` and training decode: PIL's own default,
# so a small file claiming 20000x20000 (a decompression bomb) is refused from its header.
DEFAULT_MAX_PIXELS = 89_478_485


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
    with tarfile.open(tar_path, "r:") as archive:
        return index_text(archive, tar_path)


def index_text(members: Iterable[tarfile.TarInfo], tar_path: str | Path) -> str:
    """The DALI index text of the tar whose members (in tar order) are `members`; see build_index.

    Takes members from any reader (a seekable tar, or one streamed once from object storage).
    """
    samples: list[list[str]] = []
    last_key = None
    for member in members:
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


_EXT_PATTERN = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_index(text: str, path: str = "index") -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Samples of a DALI index: (key, {ext: (data offset, size)}) in tar order.

    Every member name is checked: `<key>.<ext>` with a valid key (no path parts), one key per line,
    offsets and sizes whole numbers, so a damaged or hostile index never names a path.
    """
    lines = text.splitlines()
    fix = "re-pack the set, or run mt-shard verify on it"
    try:
        version, count = lines[0].split()
        expected = int(count)
    except (IndexError, ValueError):
        raise ShardFormatError(f"{path}: not a DALI webdataset index; {fix}") from None
    samples = []
    for number, line in enumerate(lines[1:], 2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ShardFormatError(f"{path}:{number}: expected '<ext> <offset> <size> <name>' groups; {fix}")
        components: dict[str, tuple[int, int]] = {}
        key = None
        for start in range(0, len(fields), 4):
            ext, offset, size, name = fields[start : start + 4]
            member_key = name[: len(name) - len(ext) - 1]
            if (
                not _EXT_PATTERN.match(ext) or name != f"{member_key}.{ext}" or not is_valid_key(member_key)
                or not _is_digits(offset) or not _is_digits(size) or key not in (None, member_key) or ext in components
            ):
                raise ShardFormatError(f"{path}:{number}: member {name[:60]!r} is not '<key>.<ext>' with a valid "
                                       f"key, or its offset/size is not a number; {fix}")
            key = member_key
            components[ext] = (int(offset), int(size))
        samples.append((key, components))
    if version != INDEX_VERSION or expected != len(samples):
        raise ShardFormatError(f"{path}: index header {lines[0][:40]!r} does not match its {len(samples)} lines; {fix}")
    return samples


def encode_label(label: int) -> bytes:
    return struct.pack("<i", int(label))


def decode_label(raw: bytes) -> int:
    return struct.unpack("<i", raw)[0]


def encode_class(label: int) -> bytes:
    return str(int(label)).encode("ascii")


def decode_class(raw: bytes) -> int:
    return int(raw.decode("ascii").strip())


# A shard name is a plain file name of the packer's own pattern: no separator, no `..`, never
# absolute, nothing a join could turn into a path outside the set's folder.
_SHARD_PATTERN = re.compile(r"^(train-labeled|train-unlabeled|val)-[0-9]{6,}\.tar$")


def is_shard_name(name: object, split: str | None = None) -> bool:
    """True for `<split>-NNNNNN.tar` (of `split` when given): the only names a manifest may list."""
    match = _SHARD_PATTERN.match(name) if isinstance(name, str) else None
    return bool(match) and (split is None or match.group(1) == split)


def short_repr(value: object) -> str:
    """A value read from a file, quoted in a message: escaped and cut to 40 characters (text.quoted)."""
    return quoted(value, 40)


def is_class_name(name: object) -> bool:
    """Class names are printable text without white space (labels.txt lines are '<key> <class name>')."""
    return isinstance(name, str) and bool(name) and name.isprintable() and not any(c.isspace() for c in name)


def shown(name: str) -> str:
    """A name read from a file, fit for a one-line message: as it is when plain, else quoted and escaped
    (so a newline or terminal escape in a hostile name can neither split nor forge a line)."""
    return plain_or_quoted(name, 100) if isinstance(name, str) and len(name) <= 100 else short_repr(name)

