"""`build_loaders`, the main-process loader objects (epoch length, resume position, rank padding) and
`normalize` (a uint8 batch to the model's input on its device).

Backends sit behind one contract: a function in BACKEND_BUILDERS taking a LoaderRequest and returning
(TrainLoader, ValLoader). "auto" is DALI on the GPU when CUDA and DALI are both present, else the
PyTorch backend (on a CPU, DALI's operators measure several times slower; see docs/performance.md).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.augment import AugmentSpec, get_spec
from pipelines.config import DataConfig
from pipelines.errors import PipelineError
from pipelines.mixing import reads_whole_split, resume_skips, same_topology, sample_range
from pipelines.reading import Split, check_shards, open_set
from shard_tools.format import TRAIN_LABELED, TRAIN_UNLABELED, VAL

# backend name -> "module:function" building (TrainLoader, ValLoader) from a LoaderRequest (imported on use)
BACKEND_BUILDERS = {
    "torch": "pipelines.torch_loader:build_torch_loaders",
    "dali": "pipelines.dali:build_dali_loaders",
}


@dataclass(frozen=True)
class LoaderRequest:
    """What every backend builds from: the splits, the config, one spec per view, this rank's place."""

    labeled: Split
    unlabeled: Split
    val: Split
    cfg: DataConfig
    student: AugmentSpec
    teacher: AugmentSpec
    eval_spec: AugmentSpec
    rank: int
    world_size: int
    device_id: int | None = None
    with_keys: bool = False


class TrainLoader:
    """One pass = one epoch of exactly `len(self)` two-view batches (the same count on every rank).

    `open_epoch(epoch, starts)` returns an iterable of batch dicts; starts[k] = [batches, labeled draws,
    unlabeled draws] worker k skips (resume). Batches carry `_worker`/`_index` (which worker made the
    batch, its position in that worker's epoch), `_skipped` (undecodable images replaced by the next
    sample) and optionally `_positions` (the worker's draws so far); a worker's `_error` becomes one
    PipelineError. Iterating to the end advances the epoch; `set_epoch` sets it explicitly.
    """

    def __init__(self, open_epoch: Callable[[int, list[list[int]]], Iterable[dict]],
                 quotas: Callable[[int], list[int]], batches_per_epoch: int, world_size: int, workers: int,
                 rows: tuple[int, int] = (0, 0)) -> None:
        self._open_epoch, self._quotas = open_epoch, quotas
        self._len, self.world_size, self.workers, self.rows = batches_per_epoch, world_size, workers, rows
        self.epoch = 0
        self.skipped = 0  # images that failed to decode and were replaced, since construction
        self._reset([[0, 0, 0]] * workers)
        self._resume: dict | None = None

    def _reset(self, starts: list[list[int]]) -> None:
        self._done = [start[0] for start in starts]
        self._positions = [list(start[1:]) for start in starts]
        self._yielded = sum(self._done)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resume = None
        self.epoch = epoch

    def _starts(self) -> list[list[int]]:
        state, self._resume = self._resume, None
        if state is None or state.get("epoch") != self.epoch:
            return [[0, 0, 0] for _ in range(self.workers)]
        skips = resume_skips(state, self._quotas(self.epoch), self.world_size, self.workers)
        positions = state.get("worker_positions")
        if not (same_topology(state, self.world_size, self.workers) and positions):
            positions = [[s * self.rows[0], s * self.rows[1]] for s in skips]
        return [[s, *p] for s, p in zip(skips, positions, strict=True)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        starts = self._starts()
        self._reset(starts)
        if self._yielded < self._len:
            for batch in self._open_epoch(self.epoch, starts):
                if "_error" in batch:
                    raise PipelineError(batch["_error"])
                worker, index = batch.pop("_worker"), batch.pop("_index")
                self.skipped += batch.pop("_skipped")
                self._positions[worker] = list(batch.pop("_positions", self._positions[worker]))
                self._done[worker] = index + 1
                self._yielded += 1
                yield batch
                if self._yielded >= self._len:
                    break
        self.epoch += 1
        self._reset([[0, 0, 0]] * self.workers)

    def state_dict(self) -> dict:
        """The data position: epoch, batches and draws each worker has delivered (taken by the consumer)."""
        return {"epoch": self.epoch, "worker_batches": list(self._done), "batches_done": self._yielded,
                "worker_positions": [list(p) for p in self._positions], "batches_per_epoch": self._len,
                "world_size": self.world_size, "workers": self.workers}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._resume = dict(state)


class ValLoader:
    """Eval batches; every rank yields `len(self)` batches of the same shape.

    Rows with `valid == False` are padding (label -1): the tail of a worker's last batch and whole
    batches that even out ranks holding fewer val samples. Valid rows are each val sample exactly once
    across ranks.
    """

    def __init__(self, open_pass: Callable[[], Iterable[dict]], batches: int, empty_batch: Callable[[], dict]) -> None:
        self._open_pass, self._len, self._empty_batch = open_pass, batches, empty_batch
        self.skipped = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        count = 0
        for batch in self._open_pass():
            if "_error" in batch:
                raise PipelineError(batch["_error"])
            self.skipped += batch.pop("_skipped", 0)
            count += 1
            yield batch
        for _ in range(self._len - count):
            yield self._empty_batch()


@dataclass
class Loaders:
    train: TrainLoader
    val: ValLoader
    num_classes: int
    class_names: list[str]
    backend: str
    info: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"train": self.train.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.train.load_state_dict(state["train"])

    def set_epoch(self, epoch: int) -> None:
        self.train.set_epoch(epoch)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str) -> str:
    """'auto' -> 'dali' with a CUDA GPU and DALI installed, else 'torch'."""
    if requested == "auto":
        return "dali" if torch.cuda.is_available() and dali_available() else "torch"
    if requested not in BACKEND_BUILDERS:
        raise PipelineError(f"backend {requested!r} unknown; choose auto, {', '.join(BACKEND_BUILDERS)}")
    if requested == "dali" and not dali_available():
        raise PipelineError("backend 'dali' requested but nvidia-dali is not installed; pip install "
                            "nvidia-dali-cuda120 or set data.backend=torch")
    return requested


def get_backend(name: str) -> Callable[[LoaderRequest], tuple[TrainLoader, ValLoader]]:
    module, function = BACKEND_BUILDERS[name].split(":")
    return getattr(importlib.import_module(module), function)


def build_loaders(shard_dir: str | Path, cfg: DataConfig, rank: int = 0, world_size: int = 1,
                  backend: str | None = None, *, device_id: int | None = None, with_keys: bool = False) -> Loaders:
    """Train and val loaders for `rank` of `world_size` (from Accelerate), per pipelines.mixing's rules.

    `backend` overrides cfg.backend; `device_id` is the CUDA device for DALI (default: the current one).
    `with_keys` adds "key", the list of sample keys of the rows, to every batch (tests, debugging).
    Once DALI or CUDA has run in the process, the torch backend's workers start from a forkserver, and a
    script that iterates the loaders then needs the `if __name__ == "__main__":` guard (as with spawn).
    """
    cfg.validate()
    if not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} is outside world size {world_size}")
    manifest, splits = open_set(str(shard_dir))
    chosen = resolve_backend(backend or cfg.backend)
    labeled, unlabeled, val = splits[TRAIN_LABELED], splits[TRAIN_UNLABELED], splits[VAL]
    if not labeled.total:
        raise PipelineError(f"{shard_dir}: the train-labeled split is empty; re-pack with labels")
    if cfg.unlabeled_per_batch and not unlabeled.total:
        raise PipelineError(f"{shard_dir}: the train-unlabeled split is empty; set data.labeled_per_batch = "
                            f"data.batch_size for supervised batches or re-pack with fewer labels")
    # the indexes of the shards this rank reads (the most readers per rank: torch's workers)
    shared = cfg.unlabeled_per_batch and reads_whole_split(labeled.total, world_size * max(cfg.workers, 1),
                                                           cfg.labeled_per_batch)
    check_shards(labeled, range(labeled.total) if shared else sample_range(labeled.total, rank, world_size))
    if cfg.unlabeled_per_batch:
        check_shards(unlabeled, sample_range(unlabeled.total, rank, world_size))
    check_shards(val, sample_range(val.total, rank, world_size))
    eval_spec = get_spec(cfg.eval_aug)
    request = LoaderRequest(labeled, unlabeled, val, cfg, get_spec(cfg.student_aug, eval_spec.output_size),
                            get_spec(cfg.teacher_aug, eval_spec.output_size), eval_spec, rank, world_size,
                            device_id, with_keys)
    train, val_loader = get_backend(chosen)(request)
    if len(train) == 0:
        raise PipelineError(
            f"{shard_dir}: no full training batch per rank (batch of {cfg.labeled_per_batch} labeled + "
            f"{cfg.unlabeled_per_batch} unlabeled, world size {world_size}, {cfg.workers} workers); lower "
            "data.batch_size or data.workers"
        )
    return Loaders(train=train, val=val_loader, num_classes=manifest.num_classes,
                   class_names=list(manifest.classes), backend=chosen)


@functools.lru_cache(maxsize=32)
def _normalize_constants(device: torch.device, dtype: torch.dtype, mean: tuple, std: tuple) -> tuple:
    """normalize's per-channel scale and shift, copied to the device once: a copy from the host each
    call would make every training step wait for the device (and cannot be captured in a CUDA graph)."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device, dtype=dtype).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=device, dtype=dtype).view(1, 3, 1, 1)
    return scale, shift


def normalize(images: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 N,3,H,W (0..255) -> (x/255 - mean)/std in `dtype`, as ONE kernel on the images' device."""
    device = images.device
    scale, shift = _normalize_constants(device, dtype, tuple(mean), tuple(std))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(images.shape, dtype=dtype, device=device, memory_format=fmt)
    return torch.addcmul(shift, images, scale, out=out)
