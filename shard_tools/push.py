"""`mt-shard push`: upload a finished local shard set to `s3://bucket/prefix`, manifest last.

Shards, their indexes, labels.txt and train-classes.txt go first, in parallel threads;
manifest.json goes only once every other object is there, so a reader that finds a manifest finds
the whole set. Each object carries its sha256 as metadata: a killed push run again skips every
object already there with the right size and sha256, and uploads the rest.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from shard_tools import s3
from shard_tools.files import sha256_file
from shard_tools.format import (
    LABELS_NAME,
    MANIFEST_NAME,
    SPLITS,
    TRAIN_CLASSES_NAME,
    ShardFormatError,
    index_name,
)
from shard_tools.manifest import Manifest, read_manifest
from shard_tools.s3_claim import claim_prefix

DEFAULT_WORKERS = 8  # uploads are network-bound: more threads than cores


@dataclass
class PushSummary:
    source: Path
    url: str
    uploaded: int
    skipped: int
    bytes_uploaded: int
    seconds: float

    def line(self) -> str:
        if not self.uploaded:
            return f"{self.url}: already holds the set {self.source} ({self.skipped} objects); nothing uploaded"
        rate = self.bytes_uploaded / 1e6 / max(self.seconds, 1e-9)
        return (
            f"pushed {self.source} to {self.url}: {self.uploaded} objects uploaded "
            f"({self.bytes_uploaded / 1e6:.1f} MB, {rate:.1f} MB/s), {self.skipped} already there skipped, "
            f"{MANIFEST_NAME} last; {self.seconds:.1f}s"
        )


@dataclass(frozen=True)
class _SetFile:
    name: str
    size: int
    sha256: str | None  # what the manifest says, for shards


def _set_files(source: Path, manifest: Manifest) -> list[_SetFile]:
    """Every file of the set but the manifest, checked present with the size the manifest gives."""
    files = []
    for split in SPLITS:
        info = manifest.split(split)
        for position, shard in enumerate(info.shards):
            sizes = info.bytes[position] if position < len(info.bytes) else None
            digest = info.sha256[position] if position < len(info.sha256) else None
            files.append(_SetFile(shard, _size(source, shard, sizes), digest))
            files.append(_SetFile(index_name(shard), _size(source, index_name(shard), None), None))
    files.append(_SetFile(LABELS_NAME, _size(source, LABELS_NAME, None), None))
    if (source / TRAIN_CLASSES_NAME).is_file():
        files.append(_SetFile(TRAIN_CLASSES_NAME, _size(source, TRAIN_CLASSES_NAME, None), None))
    return files


def _size(source: Path, name: str, expected: int | None) -> int:
    path = source / name
    if not path.is_file():
        raise ShardFormatError(
            f"{path}: missing, so {source} is not a complete set; finish it (run the same mt-shard pack again) "
            "or check it with mt-shard verify"
        )
    size = path.stat().st_size
    if expected is not None and size != expected:
        raise ShardFormatError(
            f"{path}: {size} bytes, the manifest says {expected}; the set is damaged: run mt-shard verify {source}"
        )
    return size


def _push_one(source: Path, url: str, entry: _SetFile, remote_size: int | None, bar: tqdm) -> bool:
    """Upload one file unless the object is already there, complete; True when it was uploaded."""
    target = s3.join(url, entry.name)
    if remote_size == entry.size:
        known = entry.sha256 or sha256_file(source / entry.name)
        info = s3.object_info(target)
        if info is not None and info.size == entry.size and info.sha256 == known:
            bar.update(entry.size)
            return False
    digest = sha256_file(source / entry.name)
    if entry.sha256 is not None and digest != entry.sha256:
        raise ShardFormatError(
            f"{source / entry.name}: sha256 differs from the manifest's; the set is damaged: "
            f"run mt-shard verify {source}"
        )
    s3.upload_file(source / entry.name, target, sha256=digest, callback=bar.update)
    return True


def _check_destination(source: Path, url: str, manifest_bytes: bytes) -> tuple[dict[str, int], bool]:
    """Objects already under the prefix, and whether its manifest is this set's (refusing another set's)."""
    remote = s3.list_sizes(url)
    if MANIFEST_NAME not in remote:
        return remote, False
    if s3.read_bytes(s3.join(url, MANIFEST_NAME)) != manifest_bytes:
        raise ShardFormatError(
            f"{s3.join(url, MANIFEST_NAME)}: the prefix already holds another shard set (its manifest differs "
            f"from {source}'s); push to a new prefix, or delete that set first"
        )
    return remote, True


def push(source: str | Path, url: str, workers: int = DEFAULT_WORKERS, progress: bool = True,
         claim: bool = True) -> PushSummary:
    """Upload the shard set folder `source` to the s3:// prefix `url`; returns what was done.

    With `claim`, the prefix is claimed first (shard_tools.s3_claim: one writer per prefix); a caller
    that already holds the claim passes False.
    """
    if s3.is_s3(str(source)):
        raise ShardFormatError(f"{source}: push uploads a local set; give a local folder as SET")
    if workers < 1:
        raise ShardFormatError(f"--workers {workers}: give at least 1")
    s3.parse_url(url)
    source = Path(source)
    started = time.perf_counter()
    manifest = read_manifest(source)
    files = _set_files(source, manifest)
    manifest_bytes = (source / MANIFEST_NAME).read_bytes()
    with claim_prefix(url, "mt-shard push") if claim else contextlib.nullcontext():
        return _upload(source, url, files, manifest_bytes, workers, progress, started)


def _upload(source: Path, url: str, files: list[_SetFile], manifest_bytes: bytes, workers: int, progress: bool,
            started: float) -> PushSummary:
    """Every file of the set not already there, in parallel threads, then the manifest."""
    remote, manifest_there = _check_destination(source, url, manifest_bytes)

    total = sum(entry.size for entry in files) + len(manifest_bytes)
    uploaded = skipped = uploaded_bytes = 0
    with tqdm(total=total, desc="push", unit="B", unit_scale=True, disable=not progress) as bar:
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="push")
        try:
            futures = {
                executor.submit(_push_one, source, url, entry, remote.get(entry.name), bar): entry for entry in files
            }
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    raise future.exception()  # the first failure: stop here, run again to resume
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
        for future, entry in futures.items():
            if future.result():
                uploaded, uploaded_bytes = uploaded + 1, uploaded_bytes + entry.size
            else:
                skipped += 1
        # Last, and only now: a reader that sees the manifest sees every object it names.
        if manifest_there:
            skipped += 1
            bar.update(len(manifest_bytes))
        else:
            s3.upload_file(source / MANIFEST_NAME, s3.join(url, MANIFEST_NAME),
                           sha256=sha256_file(source / MANIFEST_NAME), callback=bar.update)
            uploaded, uploaded_bytes = uploaded + 1, uploaded_bytes + len(manifest_bytes)
    return PushSummary(source, url, uploaded, skipped, uploaded_bytes, time.perf_counter() - started)
