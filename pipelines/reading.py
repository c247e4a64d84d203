"""Reading by sample: a split's samples located through the DALI indexes, read as one byte span per shard.

Every read (manifest, index, shard span) goes through shard_tools.storage, so a set may be a local
folder or an s3://bucket/prefix (a span is then one ranged GET). A missing index is refused with one
line (both backends need it; `wds2idx` or a re-pack rebuilds it).
"""

from __future__ import annotations

import itertools
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.errors import PipelineError
from pipelines.mixing import seed_for
from shard_tools import storage
from shard_tools.bounded import decode_text, load_json
from shard_tools.errors import os_error_message
from shard_tools.format import (
    IMAGE_EXT,
    LABEL_EXT,
    MANIFEST_NAME,
    SPLITS,
    TRAIN_UNLABELED,
    ShardFormatError,
    decode_label,
    index_name,
    parse_index,
)
from shard_tools.manifest import Manifest

VERIFY = "check the set with `mt-shard verify`"
TAR_BLOCK = 512  # a tar member's header is the 512-byte block before its data
Sample = tuple[str, bytes, int]  # key, JPEG bytes, label


@dataclass(frozen=True)
class Split:
    """One split of a shard set: its shards' URLs and sample counts in manifest order."""

    name: str
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    num_classes: int

    @property
    def total(self) -> int:
        return sum(self.counts)

    def pieces(self, samples: range) -> list[tuple[int, int, int]]:
        """(shard number, first, stop) in shard-local sample numbers for each shard `samples` touch."""
        pieces, start = [], 0
        for number, count in enumerate(self.counts):
            first, stop = max(samples.start - start, 0), min(samples.stop - start, count)
            if first < stop:
                pieces.append((number, first, stop))
            start += count
        return pieces


@dataclass(frozen=True)
class ShardIndex:
    """A shard's samples: keys and a table of (jpg offset, jpg size, lbl offset) rows."""

    keys: list[str]
    table: np.ndarray


def open_set(base: str) -> tuple[Manifest, dict[str, Split]]:
    """The manifest of the set at `base` and its splits (shard URLs beside the manifest)."""
    url = storage.join(str(base), MANIFEST_NAME)
    try:
        base = storage.check_location(base)
        # object storage: the read itself says "no such object ... upload the set with mt-shard push"
        if not storage.is_remote(base) and not storage.exists(url):
            if not storage.exists(base):
                raise PipelineError(f"{base}: no such shard set folder; pack one with mt-shard pack")
            raise PipelineError(f"{url}: missing; this folder is not a shard set (pack one with mt-shard pack)")
        data = load_json(storage.read_bytes(url), url, PipelineError, fix="re-pack the set")
        manifest = Manifest.from_dict(data, url)
    except ShardFormatError as exc:
        raise PipelineError(str(exc)) from None
    except OSError as exc:
        raise PipelineError(f"{url}: unreadable manifest ({os_error_message(exc, url)}); re-pack the set") from None
    splits = {}
    for name in SPLITS:
        info = manifest.split(name)
        bad = [s for s in info.shards if not isinstance(s, str) or "/" in s or "\\" in s or s in ("", ".", "..")]
        if bad or len(info.counts) != len(info.shards):
            problem = f"shard name {bad[0]!r} is not a plain file name" if bad else (
                f"split {name!r} lists {len(info.shards)} shards but {len(info.counts)} counts")
            raise PipelineError(f"{url}: {problem}; re-pack the set")
        splits[name] = Split(name, tuple(storage.join(base, s) for s in info.shards),
                             tuple(int(c) for c in info.counts), manifest.num_classes)
    return manifest, splits


def shard_index(split: Split, number: int) -> ShardIndex:
    """The index of shard `number`, checked against the manifest and the shard's size (one line on error)."""
    shard = split.shards[number]
    index = index_name(shard)
    try:
        try:
            shard_bytes = storage.size(shard)
        except FileNotFoundError:
            fix = "push the set again (mt-shard push)" if storage.is_remote(shard) else "re-pack or copy the set again"
            raise PipelineError(f"{shard}: shard listed in the manifest is missing; {fix}") from None
        try:
            index_bytes = storage.size(index)
        except FileNotFoundError:
            raise PipelineError(f"{index}: DALI index missing; rebuild it with `wds2idx {shard} {index}` or re-pack "
                                "the set with mt-shard pack") from None
        if index_bytes > max(shard_bytes, 1 << 16):  # an index lists a few dozen bytes per member
            raise PipelineError(f"{index}: {index_bytes} bytes, more than its {shard_bytes}-byte shard; {VERIFY}")
        text = decode_text(storage.read_bytes(index), index, PipelineError, max_bytes=index_bytes, fix=VERIFY)
        samples = parse_index(text, index)
    except ShardFormatError as exc:
        raise PipelineError(str(exc)) from None
    except OSError as exc:
        raise PipelineError(f"{index}: unreadable ({exc}); rebuild it or re-pack the set") from None
    if len(samples) != split.counts[number]:
        raise PipelineError(f"{index}: lists {len(samples)} samples, the manifest {split.counts[number]}; {VERIFY}")
    table = np.empty((len(samples), 3), dtype=np.int64)
    end = 0
    for row, (key, members) in enumerate(samples):
        _check_bounds(shard, shard_bytes, key, members)
        if IMAGE_EXT not in members or LABEL_EXT not in members:
            raise PipelineError(f"{shard}: sample {key!r} lacks .{IMAGE_EXT} or .{LABEL_EXT}; re-pack the set "
                                "with mt-shard pack")
        if members[LABEL_EXT][1] != 4:
            raise PipelineError(f"{shard}: sample {key!r} has a {members[LABEL_EXT][1]}-byte .{LABEL_EXT} member "
                                f"(4 expected); {VERIFY} and re-pack the shard")
        table[row] = members[IMAGE_EXT][0], members[IMAGE_EXT][1], members[LABEL_EXT][0]
        end = max(end, *(offset + size for offset, size in members.values()))
    if end > shard_bytes:
        raise PipelineError(f"{shard}: {shard_bytes} bytes but its index reaches byte {end}, so the shard is "
                            f"truncated; {VERIFY} and copy or re-pack it")
    return ShardIndex([key for key, _ in samples], table)


def _check_bounds(shard: str, shard_bytes: int, key: str, members: dict[str, tuple[int, int]]) -> None:
    """Each member's data lies inside the shard, after its 512-byte header, on a tar block boundary."""
    for ext, (offset, size) in members.items():
        if offset < TAR_BLOCK or offset % TAR_BLOCK or offset + size > shard_bytes:
            raise PipelineError(f"{shard}: its index puts member {key}.{ext} at bytes {offset}..{offset + size}, "
                                f"not a member's place in a {shard_bytes}-byte tar; {VERIFY} and re-pack the set")


def check_header(shard: str, span: bytes, at: int, key: str, ext: str, size: int) -> None:
    """The tar header in the 512 bytes before `at` in `span` must name member `<key>.<ext>` of `size` bytes."""
    header = span[at - TAR_BLOCK:at]
    name = f"{key}.{ext}"
    try:
        ok = (header[257:262] == b"ustar" and tarfile.nts(header[:100], "utf-8", "strict") == name
              and tarfile.nti(header[124:136]) == size and header[345:346] in (b"\0", b""))
    except (tarfile.HeaderError, UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        raise PipelineError(f"{shard}: the tar header before member {name} (as its index places it) does not name "
                            f"{name} with {size} bytes, so the index does not match the shard; {VERIFY}, then "
                            "rebuild the index (wds2idx) or re-pack the set")


def check_shards(split: Split, samples: range) -> None:
    """Check the index of every shard `samples` touch (cheap: no image data is read)."""
    for number, _, _ in split.pieces(samples):
        shard_index(split, number)


def read_piece(split: Split, number: int, first: int, stop: int, index: ShardIndex) -> list[Sample]:
    """Samples first..stop-1 of shard `number`, read as ONE byte span and cut at the index offsets."""
    shard = split.shards[number]
    rows = index.table[first:stop]
    # from the first member's tar header on: every member read is checked against its header
    start = int(min(rows[:, 0].min(), rows[:, 2].min())) - TAR_BLOCK
    end = int(max((rows[:, 0] + rows[:, 1]).max(), rows[:, 2].max() + 4))
    try:
        span = storage.read_range(shard, start, end - start)  # object storage: one ranged GET
    except OSError as exc:
        raise PipelineError(f"{shard}: unreadable ({exc}); {VERIFY}") from None
    except ShardFormatError as exc:  # object storage, after its retries: names the URL and the fix
        raise PipelineError(str(exc)) from None
    if len(span) != end - start:
        raise PipelineError(f"{shard}: ends before byte {end} that its index lists, so the shard is truncated; "
                            f"{VERIFY} and copy or re-pack it")
    labeled = split.name != TRAIN_UNLABELED
    samples = []
    for key, (image_at, image_size, label_at) in zip(index.keys[first:stop], (rows - [start, 0, start]).tolist(),
                                                      strict=True):
        check_header(shard, span, image_at, key, IMAGE_EXT, image_size)
        check_header(shard, span, label_at, key, LABEL_EXT, 4)
        label = decode_label(span[label_at:label_at + 4])
        if labeled and not 0 <= label < split.num_classes:
            raise PipelineError(f"{shard}: sample {key!r} has label {label}, outside 0..{split.num_classes - 1}; "
                                f"{VERIFY} and re-pack the set")
        samples.append((key, span[image_at:image_at + image_size], label))
    return samples


def draws(split: Split, samples: range, seed: Sequence[int | str], shuffle_buffer: int,
          cycle: bool) -> Iterator[Sample]:
    """The samples of `samples`, each pass in a fresh seeded order; `cycle` repeats passes forever.

    A range of at most `shuffle_buffer` samples is held in memory and permuted whole each pass.
    A larger one is read piece by piece (one span per shard, pieces in seeded order) through a
    shuffle buffer, so memory stays one shard's span plus `shuffle_buffer` samples. No shuffle
    buffer: range order.

    Every index the range needs is read here, before the first sample: once a reader has started,
    it only reads shard spans (a store that goes away later fails on a shard, not on an index).
    """
    pieces = split.pieces(samples)
    indexes = {number: shard_index(split, number) for number, _, _ in pieces}
    return _draws(split, samples, pieces, indexes, seed, shuffle_buffer, cycle)


def _draws(split: Split, samples: range, pieces: list[tuple[int, int, int]], indexes: dict[int, ShardIndex],
           seed: Sequence[int | str], shuffle_buffer: int, cycle: bool) -> Iterator[Sample]:
    if not len(samples):
        return

    def read(number: int, first: int, stop: int) -> list[Sample]:
        return read_piece(split, number, first, stop, indexes[number])

    held: list[Sample] | None = None
    for pass_number in itertools.count():
        rng = np.random.default_rng(seed_for(*seed, pass_number))
        if shuffle_buffer and len(samples) <= shuffle_buffer:
            held = held or [sample for piece in pieces for sample in read(*piece)]
            yield from (held[i] for i in rng.permutation(len(held)))
        else:
            order = rng.permutation(len(pieces)) if shuffle_buffer else range(len(pieces))
            yield from shuffled((s for i in order for s in read(*pieces[i])), shuffle_buffer, rng)
        if not cycle:
            return


def shuffled(stream: Iterable[Sample], size: int, rng: np.random.Generator) -> Iterator[Sample]:
    """`stream` through a shuffle buffer of `size` items (webdataset's scheme; size <= 1: as is)."""
    if size <= 1:
        yield from stream
        return
    buffer: list[Sample] = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        pick = int(rng.integers(size))
        yield buffer[pick]
        buffer[pick] = item
    for pick in rng.permutation(len(buffer)):
        yield buffer[pick]
