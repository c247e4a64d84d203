"""A shard set's manifest (`manifest.json`) and its key-class lists, read and checked.

`Manifest` and `SplitInfo` are what `manifest.json` holds; `read_manifest` is the one way every
reader (verify, info, resplit, the loaders) gets a checked one, from a folder or an s3:// prefix
(through shard_tools.storage). A manifest that names a shard by anything but a plain shard file
name, or has any damaged field, is refused with one line; `manifest_problems` lists every problem
for `mt-shard verify`. `parse_key_classes` reads `labels.txt` and `train-classes.txt`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shard_tools import storage
from shard_tools.bounded import load_json
from shard_tools.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    ShardFormatError,
    is_class_name,
    is_shard_name,
    is_valid_key,
    short_repr,
    shown,
)


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
                    f"{path}: {split} shard name {short_repr(name)} is not a plain shard file name "
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


def _is_text(value: object) -> bool:
    return isinstance(value, str)


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


# Every field of the nested objects, with its check and what it must be: verify names any other.
_NESTED_FIELDS: dict[str, dict[str, tuple]] = {
    "label_split": {"method": (_is_text, "text"), "seed": (lambda v: _is_int(v, 0), "a whole number >= 0"),
                    "labels_per_class": (_is_number, "a number"), "fraction": (_is_number, "a number"),
                    "file": (_is_text, "a path"), "resplit_of": (_is_text, "a path"),
                    "labeled_per_class": (lambda v: isinstance(v, list), "a list of counts")},
    "val_split": {"method": (_is_text, "text"), "fraction": (_is_number, "a number"),
                  "seed": (lambda v: _is_int(v, 0), "a whole number >= 0")},
    "image": {"max_side": (lambda v: v is None or _is_int(v, 1), "a pixel count or null"),
              "quality": (lambda v: _is_int(v, 1), "1..100"), "max_pixels": (lambda v: _is_int(v, 1), "a pixel count")},
}


def _nested_problems(data: dict) -> list[str]:
    """Unknown fields, and fields of the wrong type, inside label_split, val_split, image, pack_args and skipped."""
    problems = []
    for section, known in _NESTED_FIELDS.items():
        values = data.get(section)
        for name, value in values.items() if isinstance(values, dict) else ():
            if name not in known:
                problems.append(f"{section}.{shown(name)}: unknown field")
            elif not known[name][0](value):
                problems.append(f"{section}.{name} is {short_repr(value)}, not {known[name][1]}")
    pack_args = data.get("pack_args")
    for name, value in pack_args.items() if isinstance(pack_args, dict) else ():
        if not _is_scalar(value):
            problems.append(f"pack_args.{shown(name)} is {short_repr(value)}, not a single value")
    skipped = data.get("skipped")
    for position, entry in enumerate(skipped if isinstance(skipped, list) else ()):
        extra = [name for name in entry if name not in ("path", "reason", "key")] if isinstance(entry, dict) else []
        if extra:
            problems.append(f"skipped[{position}].{shown(extra[0])}: unknown field")
            break
    return problems


def _split_problems(split: str, info: object) -> list[str]:
    where = f"splits.{shown(split)}"
    if split not in SPLITS:
        return [f"{where}: unknown split (expected {', '.join(SPLITS)})"]
    if not isinstance(info, dict):
        return [f"{where} is {short_repr(info)}, not an object"]
    problems = [f"{where}.{shown(name)}: unknown field" for name in info
                if name not in ("shards", "counts", "sha256", "bytes")]
    fields = {}
    for name, check, what in (("shards", lambda v: isinstance(v, str), "a shard name"),
                              ("counts", lambda v: _is_int(v, 0), "a whole number >= 0"),
                              ("sha256", lambda v: isinstance(v, str), "a sha256 hex digest"),
                              ("bytes", lambda v: _is_int(v, 0), "a whole number >= 0")):
        values = info.get(name, [] if name == "bytes" else None)
        if not isinstance(values, list):
            problems.append(f"{where}.{name} is {short_repr(values)}, not a list")
            continue
        bad = next((i for i, v in enumerate(values) if not check(v)), None)
        if bad is not None:
            problems.append(f"{where}.{name}[{bad}] is {short_repr(values[bad])}, not {what}")
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
    problems += [f"{short_repr(name)}: unknown field" for name in data if name not in known]
    if "format_version" in data and not _is_int(data["format_version"], 1):
        problems.append(f"format_version is {short_repr(data['format_version'])}, not a version number")
    for name, kind in _OPTIONAL.items():
        if name in data and not isinstance(data[name], kind):
            problems.append(f"{name} is {short_repr(data[name])}, not a {kind.__name__}")
    classes = data.get("classes")
    if "classes" in data:
        if not isinstance(classes, list) or not classes:
            problems.append(f"classes is {short_repr(classes)}, not a list of class names")
            classes = None
        else:
            bad = next((i for i, c in enumerate(classes) if not is_class_name(c)), None)
            if bad is not None:
                problems.append(f"classes[{bad}] is {short_repr(classes[bad])}, not a class name (printable, no white space)")
            elif len(set(classes)) != len(classes):
                problems.append("classes: a class name is listed twice")
    splits = data.get("splits")
    if "splits" in data:
        if not isinstance(splits, dict):
            problems.append(f"splits is {short_repr(splits)}, not an object")
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
        problems.append(f"image is {short_repr(image)}, not an object")
    else:
        if image.get("max_side") is not None and not _is_int(image.get("max_side"), 1):
            problems.append(f"image.max_side is {short_repr(image.get('max_side'))}, not a pixel count")
        if "quality" in image and not (_is_int(image["quality"], 1) and image["quality"] <= 100):
            problems.append(f"image.quality is {short_repr(image['quality'])}, not 1..100")
        if "max_pixels" in image and not _is_int(image["max_pixels"], 1):
            problems.append(f"image.max_pixels is {short_repr(image['max_pixels'])}, not a pixel count")
    skipped = data.get("skipped", [])
    if isinstance(skipped, list):
        bad = next((i for i, e in enumerate(skipped) if not isinstance(e, dict)
                    or not isinstance(e.get("path"), str) or not isinstance(e.get("reason"), str)), None)
        if bad is not None:
            problems.append(f"skipped[{bad}] is {short_repr(skipped[bad])}, not {{'path': ..., 'reason': ...}}")
    val_split = data.get("val_split", {})
    if isinstance(val_split, dict) and val_split:
        if not isinstance(val_split.get("method"), str) or val_split["method"] not in _VAL_METHODS:
            problems.append(f"val_split.method is {short_repr(val_split.get('method'))}, not one of {', '.join(_VAL_METHODS)}")
        elif val_split["method"] == "fraction" and not _is_number(val_split.get("fraction")):
            problems.append(f"val_split.fraction is {short_repr(val_split.get('fraction'))}, not a number")
    return problems + [problem for problem in _nested_problems(data) if problem not in problems]


def _label_split_problems(label_split: object, classes: list | None) -> list[str]:
    if not isinstance(label_split, dict):
        return [f"label_split is {short_repr(label_split)}, not an object"]
    problems = []
    method = label_split.get("method")
    if not isinstance(method, str) or method not in _LABEL_METHODS:
        problems.append(f"label_split.method is {short_repr(method)}, not one of {', '.join(_LABEL_METHODS)}")
    elif (detail := _LABEL_METHODS[method]) is not None:
        value = label_split.get(detail)
        ok = isinstance(value, str) if detail == "file" else _is_number(value)
        if not ok:
            problems.append(f"label_split.{detail} is {short_repr(value)}, not a {'path' if detail == 'file' else 'number'}")
    if "seed" in label_split and not _is_int(label_split["seed"], 0):
        problems.append(f"label_split.seed is {short_repr(label_split['seed'])}, not a whole number >= 0")
    per_class = label_split.get("labeled_per_class")
    if per_class is not None:
        if not isinstance(per_class, list) or not all(_is_int(v, 0) for v in per_class):
            problems.append(f"label_split.labeled_per_class is {short_repr(per_class)}, not a list of counts")
        elif classes is not None and len(per_class) != len(classes):
            problems.append(f"label_split.labeled_per_class has {len(per_class)} counts for {len(classes)} classes")
    return problems


def manifest_path(shard_dir: str | Path) -> str:
    """Where a set's manifest is: `<folder>/manifest.json` or `s3://bucket/prefix/manifest.json`."""
    base = str(shard_dir)
    return storage.join(base, MANIFEST_NAME) if storage.is_remote(base) else str(Path(base) / MANIFEST_NAME)


def read_manifest_data(shard_dir: str | Path) -> dict:
    """The manifest's JSON object, unchecked (verify lists its problems; read_manifest refuses them).

    `shard_dir` is a local folder or an s3://bucket/prefix URL; the manifest is read through
    shard_tools.storage either way.
    """
    base = storage.check_location(shard_dir)
    path = manifest_path(base)
    if not storage.is_remote(base):
        if not Path(base).is_dir():
            raise ShardFormatError(f"{shard_dir}: no such shard set folder; pack one with mt-shard pack")
        if not Path(path).is_file():
            raise ShardFormatError(f"{path}: missing; this folder is not a shard set (pack one with mt-shard pack)")
    try:
        raw = storage.read_bytes(path)  # object storage: a missing one is one line
    except OSError as exc:
        raise ShardFormatError(f"{path}: unreadable manifest ({exc.strerror or exc}); re-pack the set") from None
    data = load_json(raw, path, ShardFormatError, fix="re-pack the set")
    check_manifest_header(data, path)
    return data


def read_manifest(shard_dir: str | Path) -> Manifest:
    """The checked manifest of a set (a folder or s3:// prefix): every reader (verify, info, resplit, the
    loaders) comes here."""
    return Manifest.from_dict(read_manifest_data(shard_dir), manifest_path(shard_dir))


def shard_paths(shard_dir: str | Path, split: str) -> list[str]:
    """Paths (URLs) of a split's shards, in manifest order."""
    manifest = read_manifest(shard_dir)
    if storage.is_remote(str(shard_dir)):
        return [storage.join(str(shard_dir), name) for name in manifest.split(split).shards]
    return [str(Path(shard_dir) / name) for name in manifest.split(split).shards]


def parse_key_classes(path: str | Path, classes: list[str] | None = None) -> tuple[dict[str, str], list[str]]:
    """`<key> <class name>` lines of labels.txt or train-classes.txt, and the problems found in them.

    Keys must be valid keys and appear once; with `classes`, each class must be one of them. At
    most a few problems are listed one by one, then counted.
    """
    name = storage.name_of(str(path))
    try:
        text = storage.read_bytes(str(path)).decode("utf-8")
    except OSError as exc:
        return {}, [f"{name}: unreadable ({exc.strerror})"]
    except UnicodeDecodeError:
        return {}, [f"{name}: not a text file"]
    pairs: dict[str, str] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            problem = f"expected '<key> <class name>', got {short_repr(line.strip())}"
        elif not is_valid_key(fields[0]):
            problem = f"{short_repr(fields[0])} is not a valid key"
        elif fields[0] in pairs:
            problem = f"key {fields[0]} is listed twice"
        elif classes is not None and fields[1] not in classes:
            problem = f"unknown class {short_repr(fields[1])}"
        else:
            pairs[fields[0]] = fields[1]
            continue
        problems.append(f"{name}:{number}: {problem}")
    if len(problems) > 5:
        problems = problems[:5] + [f"{name}: {len(problems) - 5} more damaged lines"]
    return pairs, problems
