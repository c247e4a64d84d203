"""The PyTorch backend: reading by sample, DataLoader workers, OpenCV on uint8; the fast CPU path.

Each worker decodes every JPEG once with OpenCV (at a reduced DCT scale when both views shrink the
image by 2x or more: faster and anti-aliased), renders each view with one cv2.warpAffine and one
cv2.transform, and writes whole batches into shared memory, so the main process gets finished batches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.augment import AugmentSpec, colour_matrix, geometry_matrix, sample_colour, sample_geometry
from pipelines.errors import PipelineError
from pipelines.loaders import LoaderRequest, TrainLoader, ValLoader
from pipelines.mixing import (
    batches_per_epoch,
    draw_rng,
    reader_range,
    reads_whole_split,
    seed_for,
    worker_quotas,
)
from pipelines.reading import Sample, Split, draws
from pipelines.workers import make_dataloader, storage_environment, worker_context, worker_start
from shard_tools.format import DEFAULT_MAX_PIXELS
from shard_tools.imaging import BadImage, open_image

# OpenCV decodes to BGR; this column permutation makes a colour matrix read BGR and write RGB
_BGR_TO_RGB = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.float64)
# EXIF orientation is ignored by both backends (the header size must match the pixels): the packer
# writes upright pixels
_REDUCED_FLAGS = {r: flag | cv2.IMREAD_IGNORE_ORIENTATION for r, flag in (
    (1, cv2.IMREAD_COLOR), (2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4),
    (8, cv2.IMREAD_REDUCED_COLOR_8))}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the JPEG header (SOFn marker) without decoding; None if not found."""
    pos, end = 2, len(data)
    if data[:2] != b"\xff\xd8":
        return None
    while pos + 9 < end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = int.from_bytes(data[pos + 5:pos + 7], "big")
            width = int.from_bytes(data[pos + 7:pos + 9], "big")
            return width, height
        pos += 2 + length
    return None


UNUSABLE = "its image does not decode, or holds more pixels than data.max_pixels"


def _view_scale(matrix: np.ndarray) -> float:
    """How many output pixels one source pixel spans (the larger axis), from the 2x3 matrix."""
    return float(max(np.hypot(matrix[0, 0], matrix[1, 0]), np.hypot(matrix[0, 1], matrix[1, 1])))


def render_views(data: bytes, specs: Sequence[AugmentSpec], rng: np.random.Generator,
                 outs: Sequence[np.ndarray], max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Decode `data` once and write one view per spec into `outs` (each 3,H,W uint8).

    Returns False (writing nothing) when the bytes do not decode as an image, or when the header says
    the image holds more than `max_pixels` pixels (checked before any pixel is decoded).
    """
    if not data:
        return False
    size = jpeg_size(data)
    if size is None:  # not a JPEG header we read: PIL reads the header of any other format
        try:
            size = open_image(data, max_pixels).size
        except BadImage:  # over the cap, or not an image at all
            return False
    if size[0] * size[1] > max_pixels:
        return False
    image = None
    if size is None:  # not a baseline/progressive JPEG header we can read: plain full decode
        image = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED_FLAGS[1])
        if image is None:
            return False
        size = (image.shape[1], image.shape[0])
    width, height = size
    geometry = [sample_geometry(spec, width, height, rng) for spec in specs]
    matrices = [geometry_matrix(g, width, height, spec.output_size) for g, spec in zip(geometry, specs, strict=True)]
    if image is None:
        # largest power-of-two DCT reduction that keeps every view at or above its output resolution
        reduction, scale = 1, max(_view_scale(m) for m in matrices)
        while reduction < 8 and scale * reduction * 2 <= 1.0:
            reduction *= 2
        image = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED_FLAGS[reduction])
        if image is None:
            return False
        if reduction > 1:
            offset = (reduction - 1) / 2  # reduced pixel i covers full-size pixels r*i .. r*i + r - 1
            up = np.array([[reduction, 0, offset], [0, reduction, offset], [0, 0, 1.0]])
            matrices = [m @ up for m in matrices]
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    for spec, matrix, out in zip(specs, matrices, outs, strict=True):
        _render_one(image, spec, matrix, rng, out)
    return True


def _render_one(image: np.ndarray, spec: AugmentSpec, matrix: np.ndarray, rng: np.random.Generator,
                out: np.ndarray) -> None:
    out_h, out_w = spec.output_size
    if image.shape[:2] == (out_h, out_w) and matrix.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]:
        view = image
    else:
        border = cv2.BORDER_REFLECT_101 if spec.reflect_pad else cv2.BORDER_CONSTANT
        view = cv2.warpAffine(image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=border,
                              borderValue=(0, 0, 0))
    colour = sample_colour(spec, rng)
    if colour is not None:
        mean_rgb = np.array(cv2.mean(view)[2::-1])
        transform = colour_matrix(colour, mean_rgb)
        transform[:, :3] = transform[:, :3] @ _BGR_TO_RGB
        view = cv2.transform(view, transform)  # saturating uint8, already RGB
    else:
        view = view[:, :, ::-1]
    if spec.noise_std:
        noisy = view.astype(np.float32) + rng.normal(0.0, spec.noise_std * 255.0, view.shape).astype(np.float32)
        view = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    out[...] = view.transpose(2, 0, 1)


def _shared_batch(rows: int, size: tuple[int, int]) -> torch.Tensor:
    # allocated straight in shared memory (as default_collate does) so the DataLoader hands it over
    # without the copy that share_memory_() on a private tensor would make
    shape = (rows, 3, *size)
    storage = torch.UntypedStorage._new_shared(rows * 3 * size[0] * size[1])
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


def _shard_names(split: Split, samples: range) -> str:
    shards = [split.shards[number] for number, _, _ in split.pieces(samples)]
    return shards[0] + (f" (and {len(shards) - 1} more shards)" if len(shards) > 1 else "")


class Draws:
    """One worker's draws from one split: samples in a seeded order, a fresh generator per draw.

    The generator of draw i is draw_rng(stream seed, i): a pure function of the position in the
    stream, so a resumed worker that skips i draws without decoding renders draw i exactly as before.
    """

    def __init__(self, split: Split, samples: range, seed: tuple, shuffle_buffer: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.split, self.samples, self.stream_seed = split, samples, seed_for(*seed, "view")
        self.max_pixels = max_pixels
        self._stream = draws(split, samples, (*seed, "order"), shuffle_buffer, cycle=True)
        self.position = 0  # draws so far, undecodable ones included
        self.skipped = 0  # undecodable draws so far
        self._failures = 0  # undecodable draws since the last good one

    def _next(self) -> Sample:
        try:
            sample = next(self._stream)
        except StopIteration:
            raise PipelineError(f"the {self.split.name} split gives this reader no samples; re-pack the set") from None
        self.position += 1
        return sample

    def skip_to(self, position: int) -> None:
        while self.position < position:
            self._next()

    def render(self, specs: Sequence[AugmentSpec], outs: Sequence[np.ndarray]) -> tuple[str, int]:
        """Render the next decodable draw into `outs`; (key, label)."""
        while True:
            key, data, label = self._next()
            if render_views(data, specs, draw_rng(self.stream_seed, self.position - 1), outs, self.max_pixels):
                self._failures = 0
                return key, label
            self.skip_undecodable(key)

    def skip_undecodable(self, key: str) -> None:
        """Count draw `key` as skipped (the next draw takes its place); one line once nothing decodes."""
        self.skipped += 1
        self._failures += 1
        # two passes' worth of consecutive failures always holds a whole pass: nothing here decodes
        if self._failures >= 2 * len(self.samples):
            raise PipelineError(
                f"{_shard_names(self.split, self.samples)}: none of the {len(self.samples)} {self.split.name} "
                "images this reader holds decodes; check the set with `mt-shard verify --decode` and re-pack it")
        if self._failures <= 3:
            warnings.warn(f"skipping sample {key!r}: {UNUSABLE}", stacklevel=1)


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
