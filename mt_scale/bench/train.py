"""`mt-bench train`: mt_scale.step's function timed three ways on one synthetic batch.

The Mean Teacher step; the same function with the teacher forward and EMA update off (the plain
supervised step a user would otherwise run; `train/step_ratio` = MT / this); and mt-train's
supervised baseline (mt.enabled=false, as mt-train runs it). Synthetic uint8 batches on the device
isolate compute from data loading (`mt-bench pipeline` measures that).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from mt_scale.bench.common import (
    NUM_CLASSES,
    Device,
    DeviceOptions,
    alternate,
    figure,
    option,
    positive,
    resolve_device,
)
from mt_scale.errors import MtScaleError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mt_scale.config import Config
    from mt_scale.step import MeanTeacherStep

# The figure of each way the step runs, in the order they alternate.
KINDS = ("supervised", "mean_teacher", "supervised_baseline")


@dataclass
class TrainOptions(DeviceOptions):
    model: str | None = option(None, "timm model", shown="resnet18 on CPU, resnet152 on a GPU")
    image_size: int | None = option(None, "input resolution", shown="64 on CPU, 224 on a GPU", type=positive)
    batch_size: int = option(64, "rows per step", type=positive)
    labeled_per_batch: int | None = option(None, "labeled rows per batch", shown="a quarter", type=positive)
    steps: int = option(6, "timed steps of each kind per repeat", type=positive)
    precision: str = option("auto", "auto: fp32 on CPU, bf16 + channels-last on a GPU",
                            choices=("auto", "fp32", "bf16"))  # fmt: skip


def bench_accelerator(device: Device) -> Accelerator:
    """A fresh single-process Accelerator on `device` with the bench's precision (bf16 or none)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # The bench runs in one process; an earlier Accelerator (another device or precision) is replaced.
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(
        cpu=device.name == "cpu",
        mixed_precision="bf16" if device.precision == "bf16" else "no",
        step_scheduler_with_optimizer=False,  # as mt-train: the step function steps the schedule
    )


def preset_config(model_name: str, device: Device, batch_size: int, labeled: int) -> Config:
    """The ImageNet preset's Mean Teacher recipe with the benchmark's model, batch and device."""
    from mt_scale.config import load_config

    return load_config(
        preset="imagenet-10pct-resnet152",
        overrides=[
            f"model.name={model_name}",
            f"model.channels_last={str(device.channels_last).lower()}",
            "model.compile=false",
            f"data.batch_size={batch_size}",
            f"data.labeled_per_batch={labeled}",
        ],
    )


def prepare_steps(
    cfg: Config, accelerator: Accelerator, num_classes: int = NUM_CLASSES, steps_per_epoch: int = 1000
) -> dict[str, MeanTeacherStep]:
    """The three steps of KINDS over one student, teacher and optimizer, built as mt-train builds them."""
    from mt_scale.step import MeanTeacherStep, create_training

    parts = create_training(cfg, accelerator, num_classes, steps_per_epoch)
    baseline = dataclasses.replace(cfg, mt=dataclasses.replace(cfg.mt, enabled=False))
    return {
        "supervised": MeanTeacherStep.create(cfg, accelerator, *parts, use_teacher=False),
        "mean_teacher": MeanTeacherStep.create(cfg, accelerator, *parts),
        "supervised_baseline": MeanTeacherStep.create(baseline, accelerator, *parts),
    }


class StepBench:
    """The steps of `prepare_steps` and one synthetic batch (uint8 views, L labeled rows) on the device."""

    def __init__(self, cfg: Config, device: Device, image_size: int) -> None:
        import torch

        self.cfg = cfg
        self.steps = prepare_steps(cfg, bench_accelerator(device))
        batch, labeled = cfg.data.batch_size, cfg.data.labeled_per_batch
        shape = (batch, 3, image_size, image_size)
        generator = torch.Generator().manual_seed(0)
        student = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        teacher = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
        labels = torch.where(torch.arange(batch) < labeled, labels, -1)
        self.batch = {key: value.to(device.name) for key, value in
                      {"student": student, "teacher": teacher, "label": labels}.items()}  # fmt: skip
        self.step_count = 0

    def run(self, kind: str) -> None:
        """One step of `kind` (past the consistency ramp-up)."""
        self.step_count = self.steps[kind](self.batch, self.step_count).step


def run(options: TrainOptions, work_dir: Path) -> list[dict]:
    """Images/s of each kind and `train/step_ratio` (MT / supervised time), the kinds alternating."""
    target = resolve_device(options.device, options.precision)
    on_gpu = target.name == "cuda"
    model_name = options.model or ("resnet152" if on_gpu else "resnet18")
    image_size = options.image_size or (224 if on_gpu else 64)
    batch_size, steps = options.batch_size, options.steps
    labeled = options.labeled_per_batch or max(1, batch_size // 4)
    if not 1 <= labeled <= batch_size:
        raise MtScaleError(f"--labeled-per-batch {labeled}: must be in 1..--batch-size ({batch_size})")
    bench = StepBench(preset_config(model_name, target, batch_size, labeled), target, image_size)
    calls = [functools.partial(bench.run, kind) for kind in KINDS]
    alternate(calls, 3 if on_gpu else 1, target.sync)  # first steps allocate memory and pick kernels
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    ratios = []
    for _ in tqdm(range(options.repeats), desc="train", unit="repeat"):
        seconds = dict(zip(KINDS, alternate(calls, steps, target.sync), strict=True))
        for kind in KINDS:
            rates[kind].append(bench.steps[kind].student_rows * steps / seconds[kind])
        ratios.append(seconds["mean_teacher"] / seconds["supervised"])
    detail = {
        "model": model_name,
        "image_size": image_size,
        "batch_size": batch_size,
        "labeled_per_batch": labeled,
        "steps": steps,
        "device": target.name,
        "precision": target.precision,
        "channels_last": target.channels_last,
        "two_heads": bench.cfg.model.two_heads,
        "consistency": bench.cfg.mt.consistency,
        "step": "mt_scale.step.MeanTeacherStep",
    }
    modes = {"supervised": "use_teacher=False", "mean_teacher": "mt.enabled=true",
             "supervised_baseline": "mt.enabled=false (mt-train's baseline: labeled rows only)"}  # fmt: skip
    figures = [figure(f"train/{kind}", "img/s", rates[kind], **detail, mode=modes[kind],
                      student_rows=bench.steps[kind].student_rows) for kind in KINDS]  # fmt: skip
    return [*figures, figure("train/step_ratio", "x", ratios, **detail)]
