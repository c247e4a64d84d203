"""Writing one shard: a USTAR tar via webdataset's TarWriter, then its DALI index, each under a
temporary name and renamed when complete (index first, so a finished tar always has its index)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from shard_tools.files import atomic_write, partial_path, sha256_file
from shard_tools.format import (
    CLASS_EXT,
    IMAGE_EXT,
    LABEL_EXT,
    META_EXT,
    build_index,
    encode_class,
    encode_label,
    index_name,
)

# A fixed member time makes the same samples give the same bytes (the tar stores mtimes).
MEMBER_MTIME = 946684800  # 2000-01-01


@dataclass
class ShardResult:
    name: str
    count: int
    sha256: str
    bytes: int


def sample_members(key: str, jpeg: bytes, label: int, meta: dict | None) -> dict:
    """A webdataset sample dict: image, ASCII class, int32 class, optional metadata."""
    sample = {"__key__": key, IMAGE_EXT: jpeg, CLASS_EXT: encode_class(label), LABEL_EXT: encode_label(label)}
    if meta is not None:
        sample[META_EXT] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return sample


def write_shard(out_dir: str | Path, name: str, samples: Iterable[dict],
                before_publish: Callable[[ShardResult], None] | None = None) -> ShardResult:
    """Write the samples (dicts of member bytes with `__key__`) as `out_dir/name` plus its index.

    Returns count 0 and writes nothing when `samples` is empty. `before_publish(result)` runs once the
    tar and its index are complete, just before the tar takes its final name (a resume journal records
    the shard there, so no finished shard is ever on disk unrecorded).
    """
    out_dir = Path(out_dir)
    tar_path = out_dir / name
    temp_tar = partial_path(tar_path)
    count = 0
    with open(temp_tar, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=MEMBER_MTIME) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    if count == 0:
        temp_tar.unlink()
        return ShardResult(name, 0, "", 0)
    idx_path = out_dir / index_name(name)
    atomic_write(idx_path, build_index(temp_tar))
    digest = sha256_file(temp_tar)
    result = ShardResult(name, count, digest, temp_tar.stat().st_size)
    if before_publish is not None:
        before_publish(result)
    os.replace(temp_tar, tar_path)
    return result
