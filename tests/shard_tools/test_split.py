"""Seeded class-balanced choices: labeled images, val hold-out, shuffle, labels files."""

from __future__ import annotations

from pathlib import Path

import pytest

from shard_tools.format import ShardFormatError
from shard_tools.split import (
    choose_labeled,
    holdout,
    labeled_counts,
    match_labels_file,
    read_labels_file,
    shuffled,
)

# 3 classes of 10, 7 and 4 images, interleaved.
LABELS = [0] * 10 + [1] * 7 + [2] * 4
LABELS = LABELS[::2] + LABELS[1::2]


def _per_class(indices: list[int]) -> list[int]:
    counts = [0, 0, 0]
    for index in indices:
        counts[LABELS[index]] += 1
    return counts


def test_labeled_counts_by_hand():
    assert labeled_counts([10, 7, 4], labels_per_class=3) == [3, 3, 3]
    # round half up per class: 2.5 -> 3, 1.75 -> 2, 1.0 -> 1
    assert labeled_counts([10, 7, 4], label_fraction=0.25) == [3, 2, 1]
    assert labeled_counts([10, 7, 1], label_fraction=0.1) == [1, 1, 1]  # at least one each
    assert labeled_counts([10, 7, 4]) == [10, 7, 4]
    assert labeled_counts([10, 7, 4], label_fraction=1.0) == [10, 7, 4]
    for bad in ({"label_fraction": 0.0}, {"label_fraction": 1.5}, {"labels_per_class": 0}):
        with pytest.raises(ShardFormatError):
            labeled_counts([10], **bad)
    with pytest.raises(ShardFormatError, match="not both"):
        labeled_counts([10], labels_per_class=1, label_fraction=0.5)


def test_choose_labeled_exact_per_class_and_seeded():
    chosen = choose_labeled(LABELS, 3, labels_per_class=4, seed=1)
    assert _per_class(chosen) == [4, 4, 4]
    assert chosen == sorted(set(chosen))
    assert chosen == choose_labeled(LABELS, 3, labels_per_class=4, seed=1)
    assert chosen != choose_labeled(LABELS, 3, labels_per_class=4, seed=2)
    # The split of 2 per class is inside the split of 4 (same seed).
    assert set(choose_labeled(LABELS, 3, labels_per_class=2, seed=1)) <= set(chosen)
    assert _per_class(choose_labeled(LABELS, 3, label_fraction=0.25, seed=1)) == [3, 2, 1]


def test_choose_labeled_class_too_small():
    with pytest.raises(ShardFormatError, match="class 'c' has 4 training images"):
        choose_labeled(LABELS, 3, labels_per_class=5, class_names=["a", "b", "c"])


def test_holdout_class_balanced():
    train, val = holdout(LABELS, 3, 0.3, seed=0)
    # round(3.0)=3, round(2.1)=2, round(1.2)=1
    assert _per_class(val) == [3, 2, 1]
    assert sorted(train + val) == list(range(len(LABELS)))
    assert holdout(LABELS, 3, 0.3, seed=0) == (train, val)
    assert holdout(LABELS, 3, 0.0) == (list(range(len(LABELS))), [])
    # A class never loses its last training image.
    small_train, small_val = holdout([0, 0, 1], 2, 0.9)
    assert len(small_val) == 1 and small_val[0] in (0, 1) and 2 in small_train
    with pytest.raises(ShardFormatError):
        holdout(LABELS, 3, 1.0)


def test_shuffled_is_a_seeded_permutation():
    order = shuffled(50, seed=3, split_code=1)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert order == shuffled(50, seed=3, split_code=1)
    assert order != shuffled(50, seed=3, split_code=2)


def test_labels_file_parse_and_match(tmp_path: Path):
    path = tmp_path / "labels.txt"
    path.write_text("# comment\n\nk1 cat\nimages/b c.jpg dog\nc.jpg cat\n")
    entries = read_labels_file(path, ["cat", "dog"])
    assert [(name, label) for name, label, _ in entries] == [("k1", 0), ("images/b c.jpg", 1), ("c.jpg", 0)]
    keys, origins, labels = ["k1", "k2", "k3"], ["a.jpg", "images/b c.jpg", "x/c.jpg"], [0, 1, 0]
    assert match_labels_file(entries, keys, origins, labels) == [0, 1, 2]


def test_labels_file_errors(tmp_path: Path):
    path = tmp_path / "labels.txt"
    path.write_text("k1 bird\n")
    with pytest.raises(ShardFormatError, match=r"labels.txt:1: unknown class 'bird'"):
        read_labels_file(path, ["cat", "dog"])
    path.write_text("justonefield\n")
    with pytest.raises(ShardFormatError, match="expected"):
        read_labels_file(path, ["cat"])
    with pytest.raises(ShardFormatError, match="cannot read"):
        read_labels_file(tmp_path / "missing.txt", ["cat"])
    entries = [("zz", 0, "f:1")]
    with pytest.raises(ShardFormatError, match="not a training image"):
        match_labels_file(entries, ["k1"], ["a.jpg"], [0])
    with pytest.raises(ShardFormatError, match="different class"):
        match_labels_file([("k1", 1, "f:1")], ["k1"], ["a.jpg"], [0])
    with pytest.raises(ShardFormatError, match="several images"):
        match_labels_file([("a.jpg", 0, "f:1")], ["k1", "k2"], ["x/a.jpg", "y/a.jpg"], [0, 0])
