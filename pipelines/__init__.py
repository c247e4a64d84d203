"""Shard sets to Mean Teacher batches: `build_loaders` (DALI or PyTorch backend) and `normalize`.

Default backend ("auto"): DALI on the GPU when CUDA and DALI are both present, else the PyTorch
backend. On a machine without a GPU DALI would run its CPU operators, which measure several times
slower than the PyTorch backend's OpenCV path (see docs/performance.md), so "auto" picks torch there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.augment import AUGMENT_PRESETS, AugmentSpec, get_spec
from pipelines.config import DataConfig
from pipelines.errors import PipelineError
from pipelines.loaders import Loaders, TrainLoader, ValLoader
from pipelines.mixing import batches_per_epoch, worker_quotas
from shard_tools.format import (
    TRAIN_LABELED,
    TRAIN_UNLABELED,
    VAL,
    ShardFormatError,
    index_name,
    read_manifest,
)

__all__ = ["AUGMENT_PRESETS", "AugmentSpec", "DataConfig", "Loaders", "PipelineError", "build_loaders",
           "normalize", "resolve_backend"]


def normalize(images: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 N,3,H,W (0..255) -> (x/255 - mean)/std in `dtype`, as ONE kernel on the images' device."""
    device = images.device
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device, dtype=dtype).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=device, dtype=dtype).view(1, 3, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(images.shape, dtype=dtype, device=device, memory_format=fmt)
    return torch.addcmul(shift, images, scale, out=out)


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
    if requested == "dali" and not dali_available():
        raise PipelineError("backend 'dali' requested but nvidia-dali is not installed; pip install "
                            "nvidia-dali-cuda120 or set data.backend=torch")
    if requested not in ("torch", "dali"):
        raise PipelineError(f"backend {requested!r} unknown; choose auto, torch or dali")
    return requested


def _split(shard_dir: Path, manifest, name: str, need_index: bool) -> tuple[list[str], list[int]]:
    info = manifest.split(name)
    paths = [str(shard_dir / shard) for shard in info.shards]
    for path in paths:
        if not Path(path).is_file():
            raise PipelineError(f"{path}: shard listed in the manifest is missing; re-pack or copy the set again")
        if need_index and not Path(index_name(path)).is_file():
            raise PipelineError(f"{index_name(path)}: DALI index missing; rebuild it with `wds2idx {path} "
                                f"{index_name(path)}` or re-pack the set with mt-shard pack")
    if len(info.counts) != len(paths):
        raise PipelineError(f"{shard_dir / 'manifest.json'}: split {name!r} lists {len(paths)} shards but "
                            f"{len(info.counts)} counts; re-pack the set")
    return paths, [int(c) for c in info.counts]


def build_loaders(shard_dir: str | Path, cfg: DataConfig, rank: int = 0, world_size: int = 1,
                  backend: str | None = None, *, device_id: int | None = None, with_keys: bool = False) -> Loaders:
    """Train and val loaders for `rank` of `world_size` (from Accelerate), per pipelines.mixing's rules.

    `backend` overrides cfg.backend; `device_id` is the CUDA device for DALI (default: the current one).
    `with_keys` adds "key", the list of sample keys of the rows, to every batch (tests, debugging).
    """
    cfg.validate()
    if not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} is outside world size {world_size}")
    shard_dir = Path(shard_dir)
    try:
        manifest = read_manifest(shard_dir)
    except ShardFormatError as exc:
        raise PipelineError(str(exc)) from None
    chosen = resolve_backend(backend or cfg.backend)
    need_index = chosen == "dali"
    labeled = _split(shard_dir, manifest, TRAIN_LABELED, need_index)
    unlabeled = _split(shard_dir, manifest, TRAIN_UNLABELED, need_index)
    val = _split(shard_dir, manifest, VAL, need_index)
    unlabeled_rows = cfg.unlabeled_per_batch
    if not sum(labeled[1]):
        raise PipelineError(f"{shard_dir}: the train-labeled split is empty; re-pack with labels")
    if unlabeled_rows and not sum(unlabeled[1]):
        raise PipelineError(f"{shard_dir}: the train-unlabeled split is empty; set data.labeled_per_batch = "
                            f"data.batch_size for supervised batches or re-pack with fewer labels")
    eval_spec = get_spec(cfg.eval_aug)
    student = get_spec(cfg.student_aug, eval_spec.output_size)
    teacher = get_spec(cfg.teacher_aug, eval_spec.output_size)
    if chosen == "dali":
        from pipelines.dali import build_dali


        train, val_loader = build_dali(labeled, unlabeled, val, cfg, student, teacher, eval_spec, rank,
                                       world_size, device_id, with_keys)
    else:
        train, val_loader = _build_torch(labeled, unlabeled, val, cfg, student, teacher, eval_spec, rank,
                                         world_size, with_keys)
    if len(train) == 0:
        raise PipelineError(
            f"{shard_dir}: no full training batch per rank (batch of {cfg.labeled_per_batch} labeled + "
            f"{unlabeled_rows} unlabeled, world size {world_size}, {cfg.workers} workers); lower "
            "data.batch_size or data.workers, or pack smaller shards"
        )
    return Loaders(train=train, val=val_loader, num_classes=manifest.num_classes,
                   class_names=list(manifest.classes), backend=chosen)


def _build_torch(labeled, unlabeled, val, cfg: DataConfig, student: AugmentSpec, teacher: AugmentSpec,
                 eval_spec: AugmentSpec, rank: int, world_size: int, with_keys: bool) -> tuple[TrainLoader, ValLoader]:
    from pipelines.torch_loader import TrainStream, ValStream, make_dataloader

    workers = max(cfg.workers, 1)
    stream = TrainStream(labeled, unlabeled, student, teacher, cfg.labeled_per_batch, cfg.batch_size,
                         cfg.shuffle_buffer, cfg.seed, rank, world_size, workers)
    stream.with_keys = with_keys
    epoch_split = unlabeled if cfg.unlabeled_per_batch else labeled
    per_batch = cfg.unlabeled_per_batch or cfg.labeled_per_batch

    def open_epoch(epoch: int, skips: list[int]):
        stream.epoch, stream.skips = epoch, skips
        return make_dataloader(stream, cfg.workers)

    train = TrainLoader(open_epoch, lambda epoch: worker_quotas(epoch_split[1], rank, world_size, workers, per_batch),
                        batches_per_epoch(epoch_split[1], world_size, workers, per_batch), world_size, workers)
    val_stream = ValStream(val, eval_spec, cfg.eval_batch_size, rank, world_size, workers)
    val_stream.with_keys = with_keys
    val_batches = max(sum(val_stream.batch_counts(r)) for r in range(world_size))

    def empty_val() -> dict:
        size = (cfg.eval_batch_size, 3, *eval_spec.output_size)
        return {"image": torch.zeros(size, dtype=torch.uint8), "valid": torch.zeros(cfg.eval_batch_size, dtype=torch.bool),
                "label": torch.full((cfg.eval_batch_size,), -1, dtype=torch.int64)}

    val_loader = ValLoader(lambda: make_dataloader(val_stream, cfg.workers), val_batches, empty_val)
    return train, val_loader
