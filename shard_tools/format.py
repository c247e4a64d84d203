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
        """A checked manifest: refuses (one line) hostile shard names and any damaged field."""
        check_manifest_header(data, path)
        problems = manifest_problems(data)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ShardFormatError(
                f"{path}: not a valid mt-scale manifest: {problems[0]}{more}; mt-shard verify lists every "
                "problem; re-pack the set with mt-shard pack"
            )
        try:
            return cls(
                classes=list(data["classes"]),
                splits={name: SplitInfo(**info) for name, info in data["splits"].items()},
                label_split=dict(data["label_split"]),
                image=dict(data["image"]),
                skipped=list(data.get("skipped", [])),
                tool_version=data.get("tool_version", ""),
                format_version=data["format_version"],
                source=data.get("source", ""),
                val_split=dict(data.get("val_split", {})),
                pack_args=dict(data.get("pack_args", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:  # manifest_problems should have named it first
            raise ShardFormatError(f"{path}: not a valid mt-scale manifest ({exc!r}); re-pack the set") from None


# A shard name is a plain file name of the packer's own pattern: no separator, no `..`, never
# absolute, nothing a join could turn into a path outside the set's folder.
_SHARD_PATTERN = re.compile(r"^(train-labeled|train-unlabeled|val)-[0-9]{6,}\.tar$")


def is_shard_name(name: object, split: str | None = None) -> bool:
    """True for `<split>-NNNNNN.tar` (of `split` when given): the only names a manifest may list."""
    match = _SHARD_PATTERN.match(name) if isinstance(name, str) else None
    return bool(match) and (split is None or match.group(1) == split)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_class_name(name: object) -> bool:
    """Class names are printable text without white space (labels.txt lines are '<key> <class name>')."""
    return isinstance(name, str) and bool(name) and name.isprintable() and not any(c.isspace() for c in name)


def shown(name: str) -> str:
    """A name read from a file, fit for a one-line message: as it is when plain, else quoted and escaped
    (so a newline or terminal escape in a hostile name can neither split nor forge a line)."""
    return name if name.isprintable() and not any(c.isspace() for c in name) and len(name) <= 100 else _short(name)


def check_manifest_header(data: object, path: str = MANIFEST_NAME) -> None:
    """Refuse outright what no reader may go on with: not an object, a newer format, a shard name
    that is not a plain shard file name (it could point outside the set)."""
    if not isinstance(data, dict):
        raise ShardFormatError(f"{path}: not a valid mt-scale manifest (not a JSON object); re-pack the set")
    version = data.get("format_version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: format version {version} is newer than this mt-scale reads ({FORMAT_VERSION}); upgrade mt-scale"
        )
    splits = data.get("splits")
    for split, info in splits.items() if isinstance(splits, dict) else ():
        shards = info.get("shards") if isinstance(info, dict) else None
        for name in shards if isinstance(shards, list) else ():
            if not is_shard_name(name, split if split in SPLITS else None):
                split = shown(split)
                raise ShardFormatError(
                    f"{path}: {split} shard name {_short(name)} is not a plain shard file name "
                    f"({split}-NNNNNN.tar); the set is damaged or hostile: do not use it, re-pack it"
                )


def _is_int(value: object, minimum: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_REQUIRED = ("format_version", "classes", "splits", "label_split", "image")
_OPTIONAL = {"skipped": list, "tool_version": str, "source": str, "val_split": dict, "pack_args": dict}
_LABEL_METHODS = {"labels_per_class": "labels_per_class", "fraction": "fraction", "file": "file", "all": None}
_VAL_METHODS = ("folder", "list", "archive", "fraction", "none")


def _split_problems(split: str, info: object) -> list[str]:
    where = f"splits.{shown(split)}"
    if split not in SPLITS:
        return [f"{where}: unknown split (expected {', '.join(SPLITS)})"]
    if not isinstance(info, dict):
        return [f"{where} is {_short(info)}, not an object"]
    problems = [f"{where}.{shown(name)}: unknown field" for name in info
                if name not in ("shards", "counts", "sha256", "bytes")]
    fields = {}
    for name, check, what in (("shards", lambda v: isinstance(v, str), "a shard name"),
                              ("counts", lambda v: _is_int(v, 0), "a whole number >= 0"),
                              ("sha256", lambda v: isinstance(v, str), "a sha256 hex digest"),
                              ("bytes", lambda v: _is_int(v, 0), "a whole number >= 0")):
        values = info.get(name, [] if name == "bytes" else None)
        if not isinstance(values, list):
            problems.append(f"{where}.{name} is {_short(values)}, not a list")
            continue
        bad = next((i for i, v in enumerate(values) if not check(v)), None)
        if bad is not None:
            problems.append(f"{where}.{name}[{bad}] is {_short(values[bad])}, not {what}")
        fields[name] = values
    shards = fields.get("shards")
    if shards is not None:
        for name in ("counts", "sha256", "bytes"):
            values = fields.get(name)
            if values is not None and len(values) != len(shards) and not (name == "bytes" and not values):
                problems.append(f"{where}: {len(shards)} shards but {len(values)} {name} values")
        if len(set(shards)) != len(shards):
            problems.append(f"{where}.shards: a shard is listed twice")
    return problems


def manifest_problems(data: dict) -> list[str]:
    """Every damaged field of a manifest's JSON object (empty when it is sound): types, lengths, names."""
    problems = [f"{name}: missing" for name in _REQUIRED if name not in data]
    known = set(_REQUIRED) | set(_OPTIONAL)
    problems += [f"{_short(name)}: unknown field" for name in data if name not in known]
    if "format_version" in data and not _is_int(data["format_version"], 1):
        problems.append(f"format_version is {_short(data['format_version'])}, not a version number")
    for name, kind in _OPTIONAL.items():
        if name in data and not isinstance(data[name], kind):
            problems.append(f"{name} is {_short(data[name])}, not a {kind.__name__}")
    classes = data.get("classes")
    if "classes" in data:
        if not isinstance(classes, list) or not classes:
            problems.append(f"classes is {_short(classes)}, not a list of class names")
            classes = None
        else:
            bad = next((i for i, c in enumerate(classes) if not is_class_name(c)), None)
            if bad is not None:
                problems.append(f"classes[{bad}] is {_short(classes[bad])}, not a class name (printable, no white space)")
            elif len(set(classes)) != len(classes):
                problems.append("classes: a class name is listed twice")
    splits = data.get("splits")
    if "splits" in data:
        if not isinstance(splits, dict):
            problems.append(f"splits is {_short(splits)}, not an object")
        else:
            for split, info in splits.items():
                problems += _split_problems(split, info)
            names = [n for info in splits.values() if isinstance(info, dict)
                     for n in (info.get("shards") if isinstance(info.get("shards"), list) else [])]
            if len(set(map(str, names))) != len(names):
                problems.append("splits: a shard is listed in two splits")
    problems += _label_split_problems(data.get("label_split", {}), classes)
    image = data.get("image", {})
    if not isinstance(image, dict):
        problems.append(f"image is {_short(image)}, not an object")
    else:
        if image.get("max_side") is not None and not _is_int(image.get("max_side"), 1):
            problems.append(f"image.max_side is {_short(image.get('max_side'))}, not a pixel count")
        if "quality" in image and not (_is_int(image["quality"], 1) and image["quality"] <= 100):
            problems.append(f"image.quality is {_short(image['quality'])}, not 1..100")
        if "max_pixels" in image and not _is_int(image["max_pixels"], 1):
            problems.append(f"image.max_pixels is {_short(image['max_pixels'])}, not a pixel count")
    skipped = data.get("skipped", [])
    if isinstance(skipped, list):
        bad = next((i for i, e in enumerate(skipped) if not isinstance(e, dict)
                    or not isinstance(e.get("path"), str) or not isinstance(e.get("reason"), str)), None)
        if bad is not None:
            problems.append(f"skipped[{bad}] is {_short(skipped[bad])}, not {{'path': ..., 'reason': ...}}")
    val_split = data.get("val_split", {})
    if isinstance(val_split, dict) and val_split:
        if not isinstance(val_split.get("method"), str) or val_split["method"] not in _VAL_METHODS:
            problems.append(f"val_split.method is {_short(val_split.get('method'))}, not one of {', '.join(_VAL_METHODS)}")
        elif val_split["method"] == "fraction" and not _is_number(val_split.get("fraction")):
            problems.append(f"val_split.fraction is {_short(val_split.get('fraction'))}, not a number")
    return problems


def _label_split_problems(label_split: object, classes: list | None) -> list[str]:
    if not isinstance(label_split, dict):
        return [f"label_split is {_short(label_split)}, not an object"]
    problems = []
    method = label_split.get("method")
    if not isinstance(method, str) or method not in _LABEL_METHODS:
        problems.append(f"label_split.method is {_short(method)}, not one of {', '.join(_LABEL_METHODS)}")
    elif (detail := _LABEL_METHODS[method]) is not None:
        value = label_split.get(detail)
        ok = isinstance(value, str) if detail == "file" else _is_number(value)
        if not ok:
            problems.append(f"label_split.{detail} is {_short(value)}, not a {'path' if detail == 'file' else 'number'}")
    if "seed" in label_split and not _is_int(label_split["seed"], 0):
        problems.append(f"label_split.seed is {_short(label_split['seed'])}, not a whole number >= 0")
    per_class = label_split.get("labeled_per_class")
    if per_class is not None:
        if not isinstance(per_class, list) or not all(_is_int(v, 0) for v in per_class):
            problems.append(f"label_split.labeled_per_class is {_short(per_class)}, not a list of counts")
        elif classes is not None and len(per_class) != len(classes):
            problems.append(f"label_split.labeled_per_class has {len(per_class)} counts for {len(classes)} classes")
    return problems


def read_manifest_data(shard_dir: str | Path) -> dict:
    """The manifest's JSON object, unchecked (verify lists its problems; read_manifest refuses them)."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not Path(shard_dir).is_dir():
        raise ShardFormatError(f"{shard_dir}: no such shard set folder; pack one with mt-shard pack")
    if not path.is_file():
        raise ShardFormatError(f"{path}: missing; this folder is not a shard set (pack one with mt-shard pack)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)[:80]
        raise ShardFormatError(f"{path}: unreadable manifest ({reason}); re-pack the set") from None
    check_manifest_header(data, str(path))
    return data


def read_manifest(shard_dir: str | Path) -> Manifest:
    """The checked manifest of a set: every reader (verify, info, resplit, the loaders) comes here."""
    return Manifest.from_dict(read_manifest_data(shard_dir), str(Path(shard_dir) / MANIFEST_NAME))


def shard_paths(shard_dir: str | Path, split: str) -> list[str]:
    """Absolute paths of a split's shards, in manifest order."""
    manifest = read_manifest(shard_dir)
    return [str(Path(shard_dir) / name) for name in manifest.split(split).shards]


def parse_key_classes(path: str | Path, classes: list[str] | None = None) -> tuple[dict[str, str], list[str]]:
    """`<key> <class name>` lines of labels.txt or train-classes.txt, and the problems found in them.

    Keys must be valid keys and appear once; with `classes`, each class must be one of them. At
    most a few problems are listed one by one, then counted.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        return {}, [f"{path.name}: unreadable ({exc.strerror})"]
    except UnicodeDecodeError:
        return {}, [f"{path.name}: not a text file"]
    pairs: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            problem = f"expected '<key> <class name>', got {_short(line.strip())}"
        elif not is_valid_key(fields[0]):
            problem = f"{_short(fields[0])} is not a valid key"
        elif fields[0] in pairs:
            problem = f"key {fields[0]} is listed twice"
        elif classes is not None and fields[1] not in classes:
            problem = f"unknown class {_short(fields[1])}"
        else:
            pairs[fields[0]] = fields[1]
            continue
        problems.append(f"{path.name}:{number}: {problem}")
    if len(problems) > 5:
        problems = problems[:5] + [f"{path.name}: {len(problems) - 5} more damaged lines"]
    return pairs, problems
