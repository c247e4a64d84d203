"""The PyTorch backend: reading by sample, DataLoader workers, OpenCV on uint8; the fast CPU path.

Each worker decodes every JPEG once with OpenCV (at a reduced DCT scale when both views shrink the
image by 2x or more: faster and anti-aliased), renders each view with one cv2.warpAffine and one
cv2.transform, and writes whole batches into shared memory, so the main process gets finished batches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.errors import PipelineError
from pipelines.loaders import LoaderRequest, TrainLoader, ValLoader
from pipelines.mixing import (
    batches_per_epoch,
    reader_range,
    reads_whole_split,
    worker_quotas,
)
from pipelines.reading import Split, draws
from pipelines.rendering import UNUSABLE, Draws, render_views
from pipelines.workers import make_dataloader, storage_environment, worker_context, worker_start


def _shared_batch(rows: int, size: tuple[int, int]) -> torch.Tensor:
    # allocated straight in shared memory (as default_collate does) so the DataLoader hands it over
    # without the copy that share_memory_() on a private tensor would make
    shape = (rows, 3, *size)
    storage = torch.UntypedStorage._new_shared(rows * 3 * size[0] * size[1])
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


def _guarded(batches: Iterator[dict]) -> Iterator[dict]:
    """In a worker, a PipelineError becomes one `_error` batch (the main process raises it as one line)."""
    try:
        yield from batches
    except PipelineError as exc:
        if get_worker_info() is None:
            raise
        yield {"_error": str(exc)}


class TrainStream(IterableDataset):
    """Per-worker producer of finished two-view batches (L labeled rows, then U unlabeled)."""

    def __init__(self, request: LoaderRequest) -> None:
        cfg = request.cfg
        self.labeled, self.unlabeled = request.labeled, request.unlabeled
        self.specs = (request.student, request.teacher)
        self.labeled_rows, self.unlabeled_rows = cfg.labeled_per_batch, cfg.unlabeled_per_batch
        self.shuffle_buffer, self.seed, self.with_keys = cfg.shuffle_buffer, cfg.seed, request.with_keys
        self.max_pixels = cfg.max_pixels
        self.rank, self.world_size, self.workers = request.rank, request.world_size, max(cfg.workers, 1)
        self.epoch = 0
        self.starts: list[list[int]] | None = None  # per worker: batches, labeled and unlabeled draws to skip
        self.storage_environment = storage_environment(request)

    def quotas(self) -> list[int]:
        split, rows = (self.unlabeled, self.unlabeled_rows) if self.unlabeled_rows else (self.labeled, self.labeled_rows)
        return worker_quotas(split.total, self.rank, self.world_size, self.workers, rows)

    def epoch_length(self) -> int:
        split, rows = (self.unlabeled, self.unlabeled_rows) if self.unlabeled_rows else (self.labeled, self.labeled_rows)
        return batches_per_epoch(split.total, self.world_size, self.workers, rows)

    def _draws(self, split: Split, worker: int, tag: str, whole: bool) -> Draws:
        samples = range(split.total) if whole else reader_range(split.total, self.rank, self.world_size, worker,
                                                                self.workers)
        return Draws(split, samples, (self.seed, self.epoch, self.rank, worker, tag), self.shuffle_buffer,
                     self.max_pixels)

    def __iter__(self) -> Iterator[dict]:
        return _guarded(self._batches(worker_start(self.storage_environment)))

    def _batches(self, worker: int) -> Iterator[dict]:
        labeled_rows, batch_size = self.labeled_rows, self.labeled_rows + self.unlabeled_rows
        # with U = 0 the labeled stream defines the epoch, so no sharing
        whole = self.unlabeled_rows > 0 and reads_whole_split(self.labeled.total, self.world_size * self.workers,
                                                              labeled_rows)
        labeled = self._draws(self.labeled, worker, "labeled", whole)
        unlabeled = self._draws(self.unlabeled, worker, "unlabeled", False) if self.unlabeled_rows else None
        first, labeled_at, unlabeled_at = self.starts[worker] if self.starts else (0, 0, 0)
        labeled.skip_to(labeled_at)  # resume: advance the readers without decoding
        if unlabeled is not None:
            unlabeled.skip_to(unlabeled_at)
        out_size = self.specs[0].output_size
        for index in range(first, self.quotas()[worker]):
            if out_size == self.specs[1].output_size:  # one shared-memory block for both views
                student, teacher = _shared_batch(2 * batch_size, out_size).chunk(2)
            else:
                student = _shared_batch(batch_size, out_size)
                teacher = _shared_batch(batch_size, self.specs[1].output_size)
            labels = torch.full((batch_size,), -1, dtype=torch.int64)
            skipped_before = labeled.skipped + (unlabeled.skipped if unlabeled else 0)
            student_np, teacher_np = student.numpy(), teacher.numpy()
            keys = []
            for row in range(batch_size):
                source = labeled if row < labeled_rows else unlabeled
                key, label = source.render(self.specs, (student_np[row], teacher_np[row]))
                if row < labeled_rows:
                    labels[row] = label
                keys.append(key)
            skipped = labeled.skipped + (unlabeled.skipped if unlabeled else 0) - skipped_before
            batch = {"student": student, "teacher": teacher, "label": labels, "_worker": worker, "_index": index,
                     "_skipped": skipped, "_positions": [labeled.position, unlabeled.position if unlabeled else 0]}
            if self.with_keys:
                batch["key"] = keys
            yield batch


class ValStream(IterableDataset):
    """Per-worker eval batches, no shuffle; the last batch is padded (valid=False rows)."""

    def __init__(self, request: LoaderRequest) -> None:
        self.split, self.spec, self.batch_size = request.val, request.eval_spec, request.cfg.eval_batch_size
        self.rank, self.world_size, self.workers = request.rank, request.world_size, max(request.cfg.workers, 1)
        self.with_keys = request.with_keys
        self.max_pixels = request.cfg.max_pixels
        self.storage_environment = storage_environment(request)

    def samples(self, worker: int, rank: int | None = None) -> range:
        rank = self.rank if rank is None else rank
        return reader_range(self.split.total, rank, self.world_size, worker, self.workers)

    def batch_count(self) -> int:
        """Batches of the rank with the most (every rank pads up to it)."""
        return max(sum(math.ceil(len(self.samples(k, r)) / self.batch_size) for k in range(self.workers))
                   for r in range(self.world_size))

    def __iter__(self) -> Iterator[dict]:
        return _guarded(self._batches(worker_start(self.storage_environment)))

    def _batches(self, worker: int) -> Iterator[dict]:
        rng = np.random.default_rng(0)  # eval views draw nothing random; kept for the shared signature
        rows: list[int] = []
        keys: list[str] = []
        images = _shared_batch(self.batch_size, self.spec.output_size)
        skipped = 0
        for key, data, label in draws(self.split, self.samples(worker), (), 0, cycle=False):
            if not render_views(data, (self.spec,), rng, (images.numpy()[len(rows)],), self.max_pixels):
                skipped += 1
                warnings.warn(f"skipping val sample {key!r}: {UNUSABLE}", stacklevel=1)
                continue
            rows.append(label)
            keys.append(key)
            if len(rows) == self.batch_size:
                yield _val_batch(images, rows, self.batch_size, skipped, keys if self.with_keys else None)
                images, rows, keys, skipped = _shared_batch(self.batch_size, self.spec.output_size), [], [], 0
        if rows or skipped:
            yield _val_batch(images, rows, self.batch_size, skipped, keys if self.with_keys else None)


def _val_batch(images: torch.Tensor, labels: list[int], batch_size: int, skipped: int,
               keys: list[str] | None) -> dict:
    valid = torch.zeros(batch_size, dtype=torch.bool)
    valid[:len(labels)] = True
    label = torch.full((batch_size,), -1, dtype=torch.int64)
    label[:len(labels)] = torch.tensor(labels, dtype=torch.int64)
    if len(labels) < batch_size:
        images[len(labels):] = 0
    batch = {"image": images, "label": label, "valid": valid, "_skipped": skipped}
    if keys is not None:
        batch["key"] = keys
    return batch


def build_torch_loaders(request: LoaderRequest) -> tuple[TrainLoader, ValLoader]:
    """The torch backend behind pipelines.loaders' contract."""
    cfg = request.cfg
    if cfg.workers:
        worker_context()  # a forkserver, where needed, starts now: it imports while the model is built
    stream = TrainStream(request)

    def open_epoch(epoch: int, starts: list[list[int]]) -> DataLoader:
        stream.epoch, stream.starts = epoch, starts
        return make_dataloader(stream, cfg.workers)

    def quotas(epoch: int) -> list[int]:
        return stream.quotas()

    train = TrainLoader(open_epoch, quotas, stream.epoch_length(), request.world_size, stream.workers,
                        (cfg.labeled_per_batch, cfg.unlabeled_per_batch))
    val_stream = ValStream(request)

    def empty_val() -> dict:
        size = (cfg.eval_batch_size, 3, *request.eval_spec.output_size)
        return {"image": torch.zeros(size, dtype=torch.uint8), "valid": torch.zeros(cfg.eval_batch_size, dtype=torch.bool),
                "label": torch.full((cfg.eval_batch_size,), -1, dtype=torch.int64)}

    return train, ValLoader(lambda: make_dataloader(val_stream, cfg.workers), val_stream.batch_count(), empty_val)
