"""What the DALI backend's Python workers feed its graph: the torch backend's draws, as encoded bytes.

Reader k of K on a rank reads exactly the samples, in exactly the order, that the torch backend's
DataLoader worker k reads (`pipelines.reading` through `rendering.Draws`: one span per shard, the
same seeded order, shuffle, per-rank split and skip rule), and draws each view's parameters with the
same generator (`draw_rng(seed, position)`) and the same functions (`pipelines.augment`). The DALI
graph only decodes and applies them, so both backends give the same batches, and a resumed run needs
no state beyond the torch backend's reader positions. Nothing here imports DALI: these objects run
in the pipeline's parallel external-source workers (one dedicated worker per reader).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from pipelines.augment import AugmentSpec, colour_matrix, geometry_matrix, sample_colour, sample_geometry
from pipelines.mixing import draw_rng, reader_range, reads_whole_split
from pipelines.reading import Split, draws
from pipelines.rendering import UNUSABLE, Draws, jpeg_size
from shard_tools import storage
from shard_tools.format import DEFAULT_MAX_PIXELS

# meta columns of a training row (the same in every row of a batch)
TRAIN_META = ("epoch", "worker", "index", "skipped", "labeled_position", "unlabeled_position")
# meta columns of a val row
VAL_META = ("index", "skipped", "valid_rows", "last")


def _libc_prctl():
    """prctl from the C library, looked up once here: a forked reader must not dlopen (a thread of the
    parent may have held the loader's lock at the fork, and the child would wait on it forever)."""
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


_PRCTL = _libc_prctl()


def settle_reader(parent: int, from_main_thread: bool) -> None:
    """In a reader process (forked or spawned by DALI): outlive mt-train's pre-emption signal, not the trainer.

    SIGTERM reaches the whole process group; the trainer handles it (a checkpoint at the next step),
    and a reader it killed would deadlock DALI's pool (its task queue notifies sleepers and waits for
    them to wake). So a reader ignores SIGTERM and ends when its pipeline is closed, or with process
    `parent` that started it (PR_SET_PDEATHSIG, where its main thread started it: the signal follows
    the starting thread).
    """
    with contextlib.suppress(ValueError):  # signal.signal works in the main thread only
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if from_main_thread and _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the trainer was already gone
            os._exit(0)


def feed_names(specs: Sequence[AugmentSpec]) -> list[str]:
    """The outputs a feed yields per batch, in order: bytes, label, key, meta, then each view's parameters."""
    names = ["jpeg", "label", "key", "meta"]
    for view, spec in enumerate(specs):
        names.append(f"matrix{view}")
        if spec.has_colour:
            names += [f"colour{view}", f"offset{view}"]
        if spec.noise_std:
            names.append(f"noise{view}")
    return names


def complete_jpeg_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(width, height) of a JPEG that starts with SOI, has a readable frame header, ends with EOI and
    holds at most `max_pixels` pixels; None otherwise.

    The cheap check the DALI backend's readers apply before DALI decodes: an image that fails it is
    skipped as the torch backend skips an undecodable or oversized one (zeroed or truncated members).
    """
    if data[:3] != b"\xff\xd8\xff" or b"\xff\xd9" not in data[-32:]:
        return None
    size = jpeg_size(data)
    return size if size is not None and size[0] * size[1] <= max_pixels else None


# a tiny black JPEG for the padding rows of a val batch (label -1, not valid); encoded on import, so a
# forked reader never calls OpenCV (a child forked after OpenCV's thread pool exists can hang in it)
PADDING_JPEG = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()


def dali_matrix(matrix: np.ndarray) -> np.ndarray:
    """A source->output matrix in OpenCV's pixel-centre coordinates (pixel i at i) for DALI's warp_affine,
    whose pixel i sits at i + 0.5."""
    out = np.array(matrix, dtype=np.float64)
    out[:, 2] += 0.5 - 0.5 * out[:, :2].sum(axis=1)
    return out.astype(np.float32)


def view_params(specs: Sequence[AugmentSpec], width: int, height: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each view's parameters in feed order, drawn from `rng` exactly as the torch backend draws them."""
    geometry = [sample_geometry(spec, width, height, rng) for spec in specs]
    params = []
    for spec, drawn in zip(specs, geometry, strict=True):
        params.append(dali_matrix(geometry_matrix(drawn, width, height, spec.output_size)))
        colour = sample_colour(spec, rng)
        if colour is not None:
            # contrast's centre is the view's mean grey: the graph computes it; the offset factor scales it
            params.append(colour_matrix(colour, np.zeros(3))[:, :3].astype(np.float32))
            params.append(np.array((1.0 - colour.contrast) * colour.brightness, dtype=np.float32))
        if spec.noise_std:
            params.append(rng.normal(0.0, spec.noise_std * 255.0, (*spec.output_size, 3)).astype(np.float32))
    return params


def epoch_schedule(quotas: Sequence[int], first: Sequence[int], length: int) -> list[tuple[int, int]]:
    """(reader, batch index) in the order an epoch delivers them: the round robin over readers that the
    torch backend's DataLoader makes, reader k starting at batch first[k], `length` batches in all."""
    remaining = length - sum(first)
    following, order = list(first), []
    while len(order) < remaining and any(f < q for f, q in zip(following, quotas, strict=True)):
        for reader, quota in enumerate(quotas):
            if following[reader] < quota and len(order) < remaining:
                order.append((reader, following[reader]))
                following[reader] += 1
    return order


class EncodedDraws(Draws):
    """A torch-backend reader's draws, each with the generator its views are drawn from, undecoded."""

    def take(self) -> tuple[str, bytes, int, tuple[int, int], np.random.Generator]:
        """The next draw that passes `complete_jpeg_size` (others are skipped and counted as in render)."""
        while True:
            key, data, label = self._next()
            size = complete_jpeg_size(data, self.max_pixels)
            if size is not None:
                self._failures = 0
                return key, data, label, size, draw_rng(self.stream_seed, self.position - 1)
            self.skip_undecodable(key)


def _key_bytes(key: str) -> np.ndarray:
    return np.frombuffer(key.encode(), dtype=np.uint8)


@dataclass(frozen=True)
class TrainFeed:
    """Reader `worker`'s training batches from epoch `epoch` on, as DALI external-source outputs.

    Each epoch yields exactly the batches of this reader that the loader delivers (`epoch_schedule`),
    so one continuous stream serves every following epoch. `starts` is the torch backend's resume
    position ([batches, labeled draws, unlabeled draws] per reader) for the first epoch.
    """

    labeled: Split
    unlabeled: Split
    specs: tuple[AugmentSpec, ...]
    labeled_rows: int
    unlabeled_rows: int
    seed: int
    shuffle_buffer: int
    rank: int
    world_size: int
    workers: int
    worker: int
    quotas: tuple[int, ...]
    epoch_length: int
    epoch: int
    starts: tuple[tuple[int, int, int], ...]
    storage_environment: dict[str, str] | None = None
    parent: tuple[int, bool] | None = None  # for settle_reader
    max_pixels: int = DEFAULT_MAX_PIXELS

    def scheduled(self, first: Sequence[int]) -> list[int]:
        return [index for reader, index in epoch_schedule(self.quotas, first, self.epoch_length)
                if reader == self.worker]

    def _draws(self, split: Split, epoch: int, tag: str, whole: bool) -> EncodedDraws:
        samples = range(split.total) if whole else reader_range(split.total, self.rank, self.world_size,
                                                                self.worker, self.workers)
        return EncodedDraws(split, samples, (self.seed, epoch, self.rank, self.worker, tag), self.shuffle_buffer,
                            self.max_pixels)

    def __call__(self) -> Iterator[tuple[list[np.ndarray], ...]]:
        if self.parent is not None:
            settle_reader(*self.parent)
        storage.apply_environment(self.storage_environment)
        # as the torch backend: with U = 0 the labeled stream defines the epoch, so no sharing
        whole = self.unlabeled_rows > 0 and reads_whole_split(self.labeled.total, self.world_size * self.workers,
                                                              self.labeled_rows)
        starts = self.starts
        for epoch in itertools.count(self.epoch):
            indexes = self.scheduled([start[0] for start in starts])
            if not indexes and epoch > self.epoch:
                return  # every later epoch is the same: this reader delivers nothing
            if indexes:
                labeled = self._draws(self.labeled, epoch, "labeled", whole)
                unlabeled = self._draws(self.unlabeled, epoch, "unlabeled", False) if self.unlabeled_rows else None
                labeled.skip_to(starts[self.worker][1])  # resume: advance the readers without decoding
                if unlabeled is not None:
                    unlabeled.skip_to(starts[self.worker][2])
                for index in indexes:
                    yield self._batch(epoch, index, labeled, unlabeled)
            starts = tuple((0, 0, 0) for _ in range(self.workers))

    def _batch(self, epoch: int, index: int, labeled: EncodedDraws,
               unlabeled: EncodedDraws | None) -> tuple[list[np.ndarray], ...]:
        rows = self.labeled_rows + self.unlabeled_rows
        columns: list[list[np.ndarray]] = [[] for _ in feed_names(self.specs)]
        skipped_before = labeled.skipped + (unlabeled.skipped if unlabeled else 0)
        for row in range(rows):
            source = labeled if row < self.labeled_rows else unlabeled
            key, data, label, (width, height), rng = source.take()
            values = [np.frombuffer(data, dtype=np.uint8), np.array(label if row < self.labeled_rows else -1,
                                                                      dtype=np.int64),
                      _key_bytes(key), None, *view_params(self.specs, width, height, rng)]
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        skipped = labeled.skipped + (unlabeled.skipped if unlabeled else 0) - skipped_before
        meta = np.array([epoch, self.worker, index, skipped, labeled.position,
                         unlabeled.position if unlabeled else 0], dtype=np.int64)
        columns[3] = [meta] * rows
        return tuple(columns)


@dataclass(frozen=True)
class ValFeed:
    """Reader `worker`'s val batches, pass after pass: the torch backend's ValStream batches, in order.

    A batch holds `batch_size` rows; the last of a pass is padded (label -1, a tiny black image) and
    carries last=1 in its meta, as does a final batch that only reports skipped images.
    """

    split: Split
    spec: AugmentSpec
    batch_size: int
    samples: range
    storage_environment: dict[str, str] | None = None
    parent: tuple[int, bool] | None = None  # for settle_reader
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __call__(self) -> Iterator[tuple[list[np.ndarray], ...]]:
        if self.parent is not None:
            settle_reader(*self.parent)
        storage.apply_environment(self.storage_environment)
        rng = np.random.default_rng(0)  # eval views draw nothing random
        while True:
            pending, rows, skipped, index = None, [], 0, 0
            for key, data, label in draws(self.split, self.samples, (), 0, cycle=False):
                size = complete_jpeg_size(data, self.max_pixels)
                if size is None:
                    skipped += 1
                    warnings.warn(f"skipping val sample {key!r}: {UNUSABLE}", stacklevel=1)
                    continue
                rows.append((key, data, label, size))
                if len(rows) == self.batch_size:
                    if pending is not None:
                        yield self._batch(*pending, rng, last=False)
                    pending, rows, skipped, index = (index, rows, skipped), [], 0, index + 1
            if rows or skipped:
                if pending is not None:
                    yield self._batch(*pending, rng, last=False)
                yield self._batch(index, rows, skipped, rng, last=True)
            elif pending is not None:
                yield self._batch(*pending, rng, last=True)
            else:
                return  # no samples: the loader never asks this reader

    def _batch(self, index: int, rows: list, skipped: int, rng: np.random.Generator,
               last: bool) -> tuple[list[np.ndarray], ...]:
        columns: list[list[np.ndarray]] = [[] for _ in feed_names((self.spec,))]
        padding = [("", PADDING_JPEG, -1, (8, 8))] * (self.batch_size - len(rows))
        for key, data, label, (width, height) in rows + padding:
            values = [np.frombuffer(data, dtype=np.uint8), np.array(label, dtype=np.int64), _key_bytes(key),
                      None, *view_params((self.spec,), width, height, rng)]
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        columns[3] = [np.array([index, skipped, len(rows), int(last)], dtype=np.int64)] * self.batch_size
        return tuple(columns)
