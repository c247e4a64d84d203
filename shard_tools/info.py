"""`mt-shard info`: what a shard set holds and how its label split was made."""

from __future__ import annotations

from pathlib import Path

from shard_tools.format import SPLITS
from shard_tools.manifest import read_manifest
from shard_tools.text import escaped, quoted

_SHOWN_LIMIT = 160  # characters of a path or reason from the manifest shown on a line


def _printable(value: object) -> str:
    """A value from the manifest as one short printable line: a newline or terminal escape in it is shown
    escaped and quoted, a long one cut (shard_tools.text)."""
    text = value if isinstance(value, str) else escaped(value, _SHOWN_LIMIT)
    return text if text.isprintable() and len(text) <= _SHOWN_LIMIT else quoted(text, _SHOWN_LIMIT)


def _label_method(label_split: dict) -> str:
    method = label_split.get("method")
    seed = label_split.get("seed")
    if method == "labels_per_class":
        how = f"{_printable(label_split.get('labels_per_class'))} labeled images per class, seed {_printable(seed)}"
    elif method == "fraction":
        how = f"fraction {_printable(label_split.get('fraction'))} of each class labeled, seed {_printable(seed)}"
    elif method == "file":
        how = f"labels file {_printable(label_split.get('file'))}"
    elif method == "all":
        how = "every training image labeled"
    else:
        how = _printable(method)
    if label_split.get("resplit_of"):
        how += f" (re-split of {_printable(label_split['resplit_of'])})"
    return how


def _val_method(val_split: dict) -> str:
    method = val_split.get("method")
    if method == "fraction":
        return (f"class-balanced {_printable(val_split.get('fraction'))} of the training images held out, "
                f"seed {_printable(val_split.get('seed'))}")
    if method in ("folder", "list", "archive"):
        return f"the source's own val {method}"
    return "none"


def _per_class(classes: list[str], counts: list[int]) -> str:
    if not counts:
        return "unknown"
    if len(classes) <= 20:
        return " ".join(f"{name}:{count}" for name, count in zip(classes, counts, strict=False))
    return f"min {min(counts)}, max {max(counts)}, total {sum(counts)}"


def describe(shard_dir: str | Path) -> str:
    """A few lines a person reads: classes, splits, label split, image settings, skipped inputs."""
    manifest = read_manifest(shard_dir)
    names = ", ".join(manifest.classes[:10]) + (", ..." if manifest.num_classes > 10 else "")
    lines = [
        f"shard set {_printable(str(shard_dir))} (format {manifest.format_version}, packed by mt-scale "
        f"{_printable(manifest.tool_version)})",
        f"source:   {_printable(manifest.source)}",
        f"classes:  {manifest.num_classes} ({names})",
        f"{'split':<17}{'images':>9}{'shards':>8}{'MB':>10}",
    ]
    total_images = total_bytes = 0
    for name in SPLITS:
        info = manifest.split(name)
        size = sum(info.bytes)
        total_images, total_bytes = total_images + info.num_samples, total_bytes + size
        lines.append(f"{name:<17}{info.num_samples:>9}{len(info.shards):>8}{size / 1e6:>10.1f}")
    lines.append(f"{'total':<17}{total_images:>9}{'':>8}{total_bytes / 1e6:>10.1f}")
    lines.append(f"labels:   {_label_method(manifest.label_split)}")
    lines.append(f"labeled per class: {_per_class(manifest.classes, manifest.label_split.get('labeled_per_class', []))}")
    lines.append(f"val:      {_val_method(manifest.val_split)}")
    max_side = manifest.image.get("max_side")
    lines.append(
        f"images:   {'longer side at most ' + str(max_side) + ' px' if max_side else 'original size'}, "
        f"re-encoded at JPEG quality {manifest.image.get('quality')} only when needed"
    )
    skipped = manifest.skipped
    lines.append(f"skipped:  {len(skipped)} input file(s)" + (":" if skipped else ""))
    lines.extend(f"  {_printable(entry['path'])}: {_printable(entry['reason'])}" for entry in skipped[:10])
    if len(skipped) > 10:
        lines.append(f"  ... and {len(skipped) - 10} more (see manifest.json)")
    return "\n".join(lines)
