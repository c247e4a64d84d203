"""DataConfig: the data-loading part of a run's configuration (embedded in mt_scale's Config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.errors import PipelineError
from shard_tools.format import DEFAULT_MAX_PIXELS

BACKENDS = ("auto", "torch", "dali")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """How shards become batches. Batch sizes are per device (per rank).

    `batch_size` rows per training batch, of which the first `labeled_per_batch` (L) are labeled and
    the remaining U = batch_size - L unlabeled; L == batch_size gives supervised-only batches.
    `student_aug`, `teacher_aug`, `eval_aug` name presets in `pipelines.augment.AUGMENT_PRESETS`.
    `mean`/`std` are RGB on the 0..1 scale, applied on the training device by `pipelines.normalize`.
    `shuffle_buffer` is the per-worker sample shuffle buffer (0 = no sample shuffle).
    `max_pixels` caps width x height of a training or eval image, read from its header before decoding;
    a larger one is skipped and counted like an undecodable one (the cap `mt-shard verify --decode` uses).
    """

    batch_size: int = 128
    labeled_per_batch: int = 32
    student_aug: str = "imagenet-train"
    teacher_aug: str = "imagenet-train"
    eval_aug: str = "imagenet-eval"
    workers: int = 2
    backend: str = "auto"
    shuffle_buffer: int = 1000
    eval_batch_size: int = 256
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def unlabeled_per_batch(self) -> int:
        return self.batch_size - self.labeled_per_batch

    def validate(self) -> DataConfig:
        """Raise PipelineError naming the bad field; returns self so calls chain."""
        from pipelines.augment import AUGMENT_PRESETS

        if self.batch_size < 1:
            raise PipelineError(f"data.batch_size={self.batch_size}: must be at least 1")
        if not 1 <= self.labeled_per_batch <= self.batch_size:
            raise PipelineError(
                f"data.labeled_per_batch={self.labeled_per_batch}: must be in 1..batch_size "
                f"({self.batch_size}); set it to batch_size for supervised-only batches"
            )
        for name in ("student_aug", "teacher_aug", "eval_aug"):
            preset = getattr(self, name)
            if preset not in AUGMENT_PRESETS:
                raise PipelineError(
                    f"data.{name}={preset!r}: unknown augmentation preset; choose one of "
                    f"{sorted(AUGMENT_PRESETS)}"
                )
        if self.backend not in BACKENDS:
            raise PipelineError(f"data.backend={self.backend!r}: choose one of {list(BACKENDS)}")
        if self.workers < 0 or self.shuffle_buffer < 0 or self.eval_batch_size < 1:
            raise PipelineError(
                "data.workers and data.shuffle_buffer must be >= 0 and data.eval_batch_size >= 1"
            )
        if self.max_pixels < 1:
            raise PipelineError(f"data.max_pixels={self.max_pixels}: must be at least 1 (width x height)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise PipelineError("data.mean and data.std need three RGB values (0..1 scale), std > 0")
        return self
