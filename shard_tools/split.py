"""Seeded, class-balanced choices: which training images are labeled, which are held out for val,
and the global shuffle order of a split.

Every choice draws from a generator seeded by (seed, purpose, class), so one class's choice does not
depend on the others, and for one seed the labeled set of N per class holds the one of N-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shard_tools.files import read_pairs
from shard_tools.format import ShardFormatError

_PURPOSE = {"labels": 1, "holdout": 2, "shuffle": 3}


def _rng(seed: int, purpose: str, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _PURPOSE[purpose], *extra])


def _by_class(labels: Sequence[int], num_classes: int) -> list[list[int]]:
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for index, label in enumerate(labels):
        members[label].append(index)
    return members


def labeled_counts(
    class_sizes: Sequence[int], labels_per_class: int | None = None, label_fraction: float | None = None
) -> list[int]:
    """How many images of each class get a label; raises if a class cannot supply them."""
    if labels_per_class is not None and label_fraction is not None:
        raise ShardFormatError("give either --labels-per-class or --label-fraction, not both")
    if labels_per_class is not None:
        if labels_per_class < 1:
            raise ShardFormatError(f"--labels-per-class {labels_per_class}: must be at least 1")
        return [int(labels_per_class)] * len(class_sizes)
    fraction = 1.0 if label_fraction is None else float(label_fraction)
    if not 0.0 < fraction <= 1.0:
        raise ShardFormatError(f"--label-fraction {label_fraction}: must be in (0, 1]")
    # Round half up per class (Python's round() would round half to even); keep at least one label.
    return [size if fraction == 1.0 else max(1, min(size, int(size * fraction + 0.5))) for size in class_sizes]


def choose_labeled(
    labels: Sequence[int],
    num_classes: int,
    *,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> list[int]:
    """Sorted indices (into `labels`) of the training images that keep their label."""
    members = _by_class(labels, num_classes)
    wanted = labeled_counts([len(m) for m in members], labels_per_class, label_fraction)
    chosen: list[int] = []
    for label, (indices, count) in enumerate(zip(members, wanted, strict=True)):
        if count > len(indices):
            name = class_names[label] if class_names else str(label)
            raise ShardFormatError(
                f"class {name!r} has {len(indices)} training images, fewer than --labels-per-class "
                f"{labels_per_class}; lower it or add images"
            )
        order = _rng(seed, "labels", label).permutation(len(indices))
        chosen.extend(indices[i] for i in order[:count])
    return sorted(chosen)


def holdout(labels: Sequence[int], num_classes: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Class-balanced (train, val) index lists: round(fraction * n) of each class go to val, at least
    one image of each class stays in train."""
    if not 0.0 <= fraction < 1.0:
        raise ShardFormatError(f"--val-fraction {fraction}: must be in [0, 1)")
    train: list[int] = []
    val: list[int] = []
    for label, indices in enumerate(_by_class(labels, num_classes)):
        count = min(max(len(indices) - 1, 0), int(len(indices) * fraction + 0.5))
        order = _rng(seed, "holdout", label).permutation(len(indices))
        val.extend(indices[i] for i in order[:count])
        train.extend(indices[i] for i in order[count:])
    return sorted(train), sorted(val)


def shuffled(count: int, seed: int, split_code: int) -> list[int]:
    """The global order of a split's samples: readers only shuffle within a small buffer."""
    return [int(i) for i in _rng(seed, "shuffle", split_code).permutation(count)]


def read_labels_file(path: str | Path, classes: Sequence[str]) -> list[tuple[str, int, str]]:
    """Parse `<key or file name> <class name>` lines; returns (name, class index, "file:line")."""
    entries = []
    for name, class_name, where in read_pairs(
        path, "labels file", "<key or file name> <class name>", "check --labels"
    ):
        if class_name not in classes:
            raise ShardFormatError(f"{where}: unknown class {class_name!r}; the set's classes are "
                                   f"{', '.join(list(classes)[:5])}{'...' if len(classes) > 5 else ''}")
        entries.append((name, list(classes).index(class_name), where))
    return entries


def match_labels_file(
    entries: list[tuple[str, int, str]], keys: Sequence[str], origins: Sequence[str], labels: Sequence[int]
) -> list[int]:
    """Sorted indices named by a labels file; each line may give a key, a source path or a file name."""
    lookup: dict[str, int | None] = {}
    for index, (key, origin) in enumerate(zip(keys, origins, strict=True)):
        for name in {key, origin, origin.rsplit("/", 1)[-1]}:
            # A bare file name shared by two images is ambiguous: mark it so it is refused.
            lookup[name] = None if name in lookup and lookup[name] != index else index
    chosen: set[int] = set()
    for name, label, where in entries:
        if name not in lookup:
            raise ShardFormatError(f"{where}: {name!r} is not a training image of this set; fix the labels file")
        index = lookup[name]
        if index is None:
            raise ShardFormatError(f"{where}: {name!r} names several images; use the key from labels.txt")
        if labels[index] != label:
            raise ShardFormatError(f"{where}: {name!r} is a different class in the source; fix the labels file")
        chosen.add(index)
    return sorted(chosen)
