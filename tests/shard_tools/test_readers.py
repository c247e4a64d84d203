"""Round trips: tarfile, the stock webdataset reader and DALI's readers.webdataset (CPU, with the
written indexes) all return every sample with its right label."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from sklearn.datasets import load_digits

from shard_tools.format import (
    NO_LABEL,
    SPLITS,
    TRAIN_LABELED,
    TRAIN_UNLABELED,
    VAL,
    decode_class,
    decode_label,
    index_name,
)
from shard_tools.manifest import read_manifest, shard_paths

DIGIT_TARGETS = load_digits().target


def _tar_samples(path: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for member in archive:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return samples


def _digit_truth(meta: bytes) -> int:
    return int(DIGIT_TARGETS[int(json.loads(meta)["source"].split("/")[1])])


def test_digits_tarfile_round_trip(digits_shards: Path):
    manifest = read_manifest(digits_shards)
    seen: Counter = Counter()
    per_class_labeled = Counter()
    for split in SPLITS:
        for position, path in enumerate(shard_paths(digits_shards, split)):
            samples = _tar_samples(path)
            assert len(samples) == manifest.split(split).counts[position]
            for key, parts in samples.items():
                seen[key] += 1
                truth = int(DIGIT_TARGETS[int(key.split("-")[1])])
                assert _digit_truth(parts["json"]) == truth
                label = decode_label(parts["lbl"])
                assert decode_class(parts["cls"]) == label
                assert label == (NO_LABEL if split == TRAIN_UNLABELED else truth)
                assert parts["jpg"][:2] == b"\xff\xd8"
                if split == TRAIN_LABELED:
                    per_class_labeled[label] += 1
    assert len(seen) == 1797 and set(seen.values()) == {1}
    assert per_class_labeled == {digit: 5 for digit in range(10)}


def test_digits_stock_webdataset_reader(digits_shards: Path):
    for split in SPLITS:
        paths = shard_paths(digits_shards, split)
        dataset = wds.WebDataset(paths, shardshuffle=False, empty_check=False).decode("pil")
        count = 0
        for sample in dataset:
            truth = int(DIGIT_TARGETS[int(sample["__key__"].split("-")[1])])
            expected = NO_LABEL if split == TRAIN_UNLABELED else truth
            assert sample["cls"] == expected and decode_label(sample["lbl"]) == expected
            assert sample["jpg"].size == (32, 32)
            count += 1
        assert count == read_manifest(digits_shards).split(split).num_samples


def _dali_read(paths: list[str], batch_size: int = 64) -> list[tuple[tuple, int, bytes]]:
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None)
    def pipeline():
        jpg, lbl, meta = fn.readers.webdataset(
            paths=paths, index_paths=[p[:-4] + ".idx" for p in paths], ext=["jpg", "lbl", "json"],
            dtypes=[types.UINT8, types.INT32, types.UINT8], random_shuffle=False, name="reader",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), lbl, meta

    pipe = pipeline()
    pipe.build()
    total = pipe.epoch_size("reader")
    found = []
    while len(found) < total:
        images, labels, metas = pipe.run()
        for i in range(len(labels)):
            if len(found) < total:
                found.append((np.array(images[i]).shape, int(np.array(labels[i])[0]), bytes(np.array(metas[i]))))
    return found


def test_digits_dali_reader_cpu(digits_shards: Path):
    for split in SPLITS:
        found = _dali_read(shard_paths(digits_shards, split))
        assert len(found) == read_manifest(digits_shards).split(split).num_samples
        for shape, label, meta in found:
            assert shape == (32, 32, 3)
            assert label == (NO_LABEL if split == TRAIN_UNLABELED else _digit_truth(meta))
        sources = [json.loads(meta)["source"] for _, _, meta in found]
        assert len(set(sources)) == len(sources)


def test_photo_shards_all_readers_agree(photo_shards: Path):
    manifest = read_manifest(photo_shards)
    assert manifest.classes == ["n00000000", "n00000001", "n00000002", "n00000003"]
    for split in SPLITS:
        paths = shard_paths(photo_shards, split)
        for path in paths:
            assert Path(path[:-4] + ".idx").name == index_name(Path(path).name)
        by_tarfile = {}
        for path in paths:
            for key, parts in _tar_samples(path).items():
                truth = manifest.classes.index(json.loads(parts["json"])["source"].split("/")[1])
                assert decode_label(parts["lbl"]) == (NO_LABEL if split == TRAIN_UNLABELED else truth)
                by_tarfile[key] = decode_label(parts["lbl"])
        by_wds = {s["__key__"]: decode_label(s["lbl"]) for s in wds.WebDataset(paths, shardshuffle=False)}
        assert by_wds == by_tarfile
        dali = _dali_read(paths, batch_size=8)
        assert Counter(label for _, label, _ in dali) == Counter(by_tarfile.values())
        assert {shape for shape, _, _ in dali} == {(240, 320, 3)}
    assert manifest.split(TRAIN_LABELED).num_samples == 16  # a quarter of 16 per class, 4 classes
    assert manifest.split(TRAIN_UNLABELED).num_samples == 48
    assert manifest.split(VAL).num_samples == 16
