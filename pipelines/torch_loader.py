"""The PyTorch backend: stock webdataset reader, DataLoader workers, OpenCV on uint8; the fast CPU path.

Each worker reads its own shards (see pipelines.mixing), decodes every JPEG once with OpenCV (at a
reduced DCT scale when both views shrink the image by 2x or more, which is both faster and
anti-aliased), renders each view with one cv2.warpAffine and one cv2.transform (the 3x4 colour
matrix, with OpenCV's BGR->RGB folded in), and writes whole batches straight into shared memory, so
the main process receives finished uint8 NCHW batches without a copy.

Augmentation randomness comes from a generator seeded by (seed, epoch, sample key): a sample gets
the same views whatever the worker count, and a resumed epoch replays exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.augment import AugmentSpec, colour_matrix, geometry_matrix, sample_colour, sample_geometry
from pipelines.errors import PipelineError
from pipelines.mixing import plan_stream, resume_skips, seed_for, split_indices, worker_quotas
from shard_tools.format import IMAGE_EXT, LABEL_EXT, decode_label

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


def _view_scale(matrix: np.ndarray) -> float:
    """How many output pixels one source pixel spans (the larger axis), from the 2x3 matrix."""
    return float(max(np.hypot(matrix[0, 0], matrix[1, 0]), np.hypot(matrix[0, 1], matrix[1, 1])))


def render_views(data: bytes, specs: Sequence[AugmentSpec], rng: np.random.Generator,
                 outs: Sequence[np.ndarray]) -> bool:
    """Decode `data` once and write one view per spec into `outs` (each 3,H,W uint8).

    Returns False (writing nothing) when the bytes do not decode as an image.
    """
    size = jpeg_size(data)
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


def _reraise(exn: Exception) -> bool:
    raise PipelineError(
        f"reading a shard failed ({exn!r}); check the set with `mt-shard verify` and re-pack damaged shards"
    ) from exn


def sample_stream(shards: Sequence[str], *, rank: int, world_size: int, worker: int, workers: int,
                  share_if_short: bool, shuffle_buffer: int, seed: int, cycle: bool) -> Iterator[tuple[str, bytes, int]]:
    """(key, jpeg bytes, label) from the stock webdataset reader; `cycle` repeats with a new shuffle per pass."""
    def by_node(urls):
        urls = list(urls)
        yield from (urls[i] for i in split_indices(len(urls), rank, world_size, share_if_short=share_if_short))

    def by_worker(urls):
        urls = list(urls)
        yield from (urls[i] for i in split_indices(len(urls), worker, workers, share_if_short=share_if_short))

    passes = 0
    while True:
        pass_seed = seed_for(seed, passes)
        dataset = wds.WebDataset(
            list(shards), handler=_reraise, shardshuffle=len(shards) if shuffle_buffer else False,
            nodesplitter=by_node, workersplitter=by_worker, empty_check=False, seed=pass_seed,
            select_files=lambda name: name.endswith((f".{IMAGE_EXT}", f".{LABEL_EXT}")),
        )
        if shuffle_buffer:
            dataset = dataset.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=pass_seed + 1)
        count = 0
        for sample in dataset:
            if IMAGE_EXT not in sample or LABEL_EXT not in sample:
                raise PipelineError(
                    f"{sample.get('__url__')}: sample {sample.get('__key__')!r} lacks .{IMAGE_EXT} or "
                    f".{LABEL_EXT}; re-pack the set with mt-shard pack"
                )
            count += 1
            yield sample["__key__"], sample[IMAGE_EXT], decode_label(sample[LABEL_EXT])
        passes += 1
        if not cycle or count == 0:
            return


def _shared_batch(rows: int, size: tuple[int, int]) -> torch.Tensor:
    # allocated straight in shared memory (as default_collate does) so the DataLoader hands it over
    # without the copy that share_memory_() on a private tensor would make
    shape = (rows, 3, *size)
    storage = torch.UntypedStorage._new_shared(rows * 3 * size[0] * size[1])
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


class TrainStream(IterableDataset):
    """Per-worker producer of finished two-view batches (L labeled rows, then U unlabeled)."""

    def __init__(self, labeled: tuple[list[str], list[int]], unlabeled: tuple[list[str], list[int]],
                 student: AugmentSpec, teacher: AugmentSpec, labeled_per_batch: int, batch_size: int,
                 shuffle_buffer: int, seed: int, rank: int, world_size: int, workers: int) -> None:
        self.labeled, self.unlabeled = labeled, unlabeled
        self.specs = (student, teacher)
        self.labeled_per_batch, self.batch_size = labeled_per_batch, batch_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size, self.workers = rank, world_size, max(workers, 1)
        self.epoch = 0
        self.skips: list[int] | None = None
        self.with_keys = False  # add "key": list of sample keys to each batch (tests, debugging)

    def quotas(self) -> list[int]:
        unlabeled_rows = self.batch_size - self.labeled_per_batch
        shards, counts = self.unlabeled if unlabeled_rows else self.labeled
        return worker_quotas(counts, self.rank, self.world_size, self.workers,
                             unlabeled_rows or self.labeled_per_batch)

    def _stream(self, split: tuple[list[str], list[int]], worker: int, share: bool, tag: str):
        return sample_stream(split[0], rank=self.rank, world_size=self.world_size, worker=worker,
                             workers=self.workers, share_if_short=share, shuffle_buffer=self.shuffle_buffer,
                             seed=seed_for(self.seed, self.epoch, self.rank, worker, tag), cycle=True)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is None:  # in-process (workers=0): keep OpenCV to one thread like the workers
            cv2.setNumThreads(1)
        labeled_rows = self.labeled_per_batch
        unlabeled_rows = self.batch_size - labeled_rows
        quota = self.quotas()[worker]
        skip = self.skips[worker] if self.skips else 0
        # the labeled stream cycles and may be shared; with U = 0 it defines the epoch, so no sharing
        labeled = self._stream(self.labeled, worker, share=unlabeled_rows > 0, tag="labeled")
        unlabeled = self._stream(self.unlabeled, worker, share=False, tag="unlabeled") if unlabeled_rows else None
        out_size = self.specs[0].output_size
        for index in range(quota):
            if index < skip:  # resume: advance the readers without decoding
                for _ in range(labeled_rows):
                    next(labeled)
                for _ in range(unlabeled_rows):
                    next(unlabeled)
                continue
            if out_size == self.specs[1].output_size:  # one shared-memory block for both views
                student, teacher = _shared_batch(2 * self.batch_size, out_size).chunk(2)
            else:
                student = _shared_batch(self.batch_size, out_size)
                teacher = _shared_batch(self.batch_size, self.specs[1].output_size)
            labels = torch.empty(self.batch_size, dtype=torch.int64)
            skipped, keys = 0, []
            student_np, teacher_np = student.numpy(), teacher.numpy()
            for row in range(self.batch_size):
                source = labeled if row < labeled_rows else unlabeled
                while True:
                    try:
                        key, data, label = next(source)
                    except StopIteration:
                        raise PipelineError("a training split has no readable samples; re-pack the set") from None
                    rng = np.random.default_rng(seed_for(self.seed, self.epoch, key))
                    if render_views(data, self.specs, rng, (student_np[row], teacher_np[row])):
                        break
                    skipped += 1
                    warnings.warn(f"skipping sample {key!r}: its image does not decode", stacklevel=1)
                labels[row] = label if row < labeled_rows else -1
                keys.append(key)
            batch = {"student": student, "teacher": teacher, "label": labels,
                     "_worker": worker, "_index": index, "_skipped": skipped}
            if self.with_keys:
                batch["key"] = keys
            yield batch


class ValStream(IterableDataset):
    """Per-worker eval batches, no shuffle; the last batch is padded (valid=False rows)."""

    def __init__(self, split: tuple[list[str], list[int]], spec: AugmentSpec, batch_size: int,
                 rank: int, world_size: int, workers: int) -> None:
        self.split, self.spec, self.batch_size = split, spec, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(workers, 1)
        self.with_keys = False

    def batch_counts(self, rank: int | None = None) -> list[int]:
        rank = self.rank if rank is None else rank
        return [math.ceil(plan_stream(self.split[0], self.split[1], rank, self.world_size, k, self.workers,
                                      share_if_short=False).samples / self.batch_size)
                for k in range(self.workers)]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = sample_stream(self.split[0], rank=self.rank, world_size=self.world_size, worker=worker,
                               workers=self.workers, share_if_short=False, shuffle_buffer=0, seed=0, cycle=False)
        rng = np.random.default_rng(0)  # eval views draw nothing random; kept for the shared signature
        rows: list[int] = []
        keys: list[str] = []
        images = _shared_batch(self.batch_size, self.spec.output_size)
        skipped = 0
        for key, data, label in stream:
            if not render_views(data, (self.spec,), rng, (images.numpy()[len(rows)],)):
                skipped += 1
                warnings.warn(f"skipping val sample {key!r}: its image does not decode", stacklevel=1)
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


def make_dataloader(dataset: IterableDataset, workers: int) -> DataLoader:
    """A DataLoader whose workers yield finished batches (batch_size=None), forked per epoch.

    OpenCV is set to one thread here, in the calling process, before any fork: a worker forked from
    a process whose OpenCV thread pool exists hangs in its first cv2.setNumThreads call (the pool's
    threads are not copied by fork). The main process does no image work, so this costs nothing;
    the workers inherit the setting, and each worker is one core's worth of parallelism.
    """
    if workers:
        cv2.setNumThreads(1)
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=2 if workers else None, persistent_workers=False,
                      multiprocessing_context="fork" if workers and _fork_ok() else None)


def _fork_ok() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


__all__ = ["TrainStream", "ValStream", "make_dataloader", "render_views", "resume_skips", "sample_stream"]
