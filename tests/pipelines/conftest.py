"""Fixtures for the pipelines tests: what the shards hold (read with plain tarfile) and damaged copies."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from pipelines import DataConfig
from shard_tools.format import SPLITS, decode_label, index_name
from shard_tools.manifest import read_manifest


def read_split(shard_dir: Path, split: str) -> dict[str, tuple[int, bytes]]:
    """key -> (label, jpeg bytes) for every sample of a split, straight from the tars."""
    samples: dict[str, dict] = {}
    for name in read_manifest(shard_dir).split(split).shards:
        with tarfile.open(shard_dir / name) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {key: (decode_label(parts["lbl"]), parts["jpg"]) for key, parts in samples.items()}


@pytest.fixture(scope="session")
def digits_content(digits_shards: Path) -> dict[str, dict[str, tuple[int, bytes]]]:
    return {split: read_split(digits_shards, split) for split in SPLITS}


def _digits_config(**overrides) -> DataConfig:
    values = dict(batch_size=64, labeled_per_batch=16, student_aug="digits-train", teacher_aug="digits-train",
                  eval_aug="digits-eval", workers=2, shuffle_buffer=64, eval_batch_size=128, seed=0)
    values.update(overrides)
    return DataConfig(**values)


@pytest.fixture(scope="session")
def digits_config():
    """DataConfig factory for the digits set: 16 labeled + 48 unlabeled rows, 2 workers, unless overridden."""
    return _digits_config


@pytest.fixture
def damaged_digits(digits_shards: Path, tmp_path: Path):
    """A fresh copy of the digits set plus a function that corrupts one unlabeled image in place."""
    copy = tmp_path / "digits"
    shutil.copytree(digits_shards, copy)

    def corrupt_one_image(kind: str = "zeros") -> str:
        """Overwrite one unlabeled JPEG: all zeros, or its first third kept (a truncated download)."""
        shard = copy / read_manifest(copy).split("train-unlabeled").shards[0]
        with tarfile.open(shard) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
            data = tar.extractfile(member).read()
        kept = data[:member.size // 3] if kind == "truncated" else b""
        with open(shard, "r+b") as handle:  # same length, so the tar and its DALI index stay valid
            handle.seek(member.offset_data)
            handle.write(kept + b"\x00" * (member.size - len(kept)))
        return member.name.split(".")[0]

    def remove_index(split: str = "train-labeled") -> Path:
        path = Path(index_name(str(copy / read_manifest(copy).split(split).shards[0])))
        path.unlink()
        return path

    return copy, corrupt_one_image, remove_index
