"""The sizes of a run (Plan: the GPU plan and the dry run's), the names of its figures and checks, and the
context its parts share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mt_scale.errors import MtScaleError

if TYPE_CHECKING:
    from mt_scale.bench.gpu.data import Data
    from mt_scale.bench.gpu.report import Report

PRESET = "imagenet-10pct-resnet152"  # the recipe the figures are about
NUM_CLASSES = 1000
GOAL_MT_IMG_S = 1400.0  # issue 14, one H100, end to end with the DALI loader
GOAL_LOADER_X = 2.0  # loader at least 2x the step's demand
GOAL_EMA_X = 10.0  # fused EMA at least 10x the per-tensor loop
RESULT_KEYS = (
    "gpu/loader_img_s", "gpu/loader_keeps_up",
    "gpu/mt_step_img_s", "gpu/supervised_step_img_s",
    "gpu/mt_step_img_s/compile", "gpu/supervised_step_img_s/compile",
    "gpu/max_batch", "gpu/mt_step_img_s/max_batch", "gpu/supervised_step_img_s/max_batch",
    "gpu/mt_step_img_s/max_batch_compile", "gpu/supervised_step_img_s/max_batch_compile",
    "gpu/peak_mem_gib", "gpu/compile_s",
    "gpu/mt_end_to_end_img_s", "gpu/mt_end_to_end_img_s/global_batch", "gpu/mt_end_to_end_img_s/max_batch",
    "gpu/ema_fused_ms", "gpu/ema_loop_ms", "gpu/ema_speedup",
)  # fmt: skip
CHECK_NAMES = (
    "dali/structure",
    "dali/eval_matches_torch",
    "dali/geometry",
    "dali/colour",
    "train/mt_train_30_steps",
    "train/resume_exact",
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one run. GPU_PLAN fits 8 minutes on one H100; DRY_PLAN is the same code, tiny, on CPU."""

    dry_run: bool
    budget_s: float  # optional parts (torch.compile) are skipped when they would overrun it
    model: str = "resnet152"
    ema_model: str = "resnet152"
    precision: str = "bf16"  # Accelerate's mixed_precision
    compile_backend: str = "inductor"  # torch.compile's default; the dry run traces with "eager"
    view_size: int = 224  # synthetic step inputs
    batch: int = 40  # the preset's per-device batch (the reference's base_batch_size) ...
    labeled: int = 20  # ... and labeled rows
    global_batch: int = 400  # the preset's whole batch (half labeled), on one device
    warmup_steps: int = 5
    timed_steps: int = 20
    max_batch_cap: int = 2048
    photos: int = 1024  # ImageNet-size JPEGs for the loader
    photo_size: tuple[int, int] = (500, 375)
    val_photos: int = 32
    loader_workers: int = 8  # DALI threads per pipeline (the preset's data.workers)
    loader_warmup: int = 10
    loader_batches: int = 100
    stat_views: int = 512  # views per statistics check
    stat_batch: int = 64
    ema_blocks: int = 5
    ema_updates: int = 10  # per block
    e2e_warmup: int = 10
    e2e_steps: int = 60
    train_model: str = "resnet152"
    train_photo_size: tuple[int, int] = (320, 240)
    train_classes: int = 10
    train_labels_per_class: int = 10  # 100 labeled, 200 unlabeled: 10 steps of 20 unlabeled rows per epoch
    train_photos: int = 300
    train_val: int = 40

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


GPU_PLAN = Plan(dry_run=False, budget_s=420.0)  # + imports and install: under 8 minutes
DRY_PLAN = Plan(
    dry_run=True, budget_s=600.0, model="test_resnet", ema_model="test_resnet", precision="no",
    compile_backend="eager", view_size=64, batch=4, labeled=2, global_batch=8, warmup_steps=1, timed_steps=3,
    max_batch_cap=16,
    photos=24, photo_size=(64, 64), val_photos=8, loader_workers=1, loader_warmup=1, loader_batches=4,
    stat_views=64, stat_batch=32, ema_blocks=2, ema_updates=3, e2e_warmup=1, e2e_steps=3,
    train_model="test_resnet",
    train_photo_size=(64, 64), train_classes=2, train_labels_per_class=5, train_photos=30, train_val=8,
)  # fmt: skip


@dataclass
class Context:
    """What the parts share: the report, the plan, the work folder, the generated data, the largest batch."""

    report: Report
    plan: Plan
    work: Path
    data: Data | None = None
    max_batch: int | None = None

    def need_data(self) -> Data:
        if self.data is None:
            raise MtScaleError("the generated data is missing: the 'data' part failed or did not run")
        return self.data
