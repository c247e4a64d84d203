"""mt-bench's model stages: a Mean Teacher training step vs a supervised one, and the EMA update.

Both stages run the product's own pieces (mt_scale.model, losses, optim, teacher) on synthetic
uint8 batches, so the figures isolate compute from data loading (`mt-bench pipeline` measures that).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mt_scale.bench_common import Stopwatch, figure
from mt_scale.errors import MtScaleError

NUM_CLASSES = 1000  # ImageNet's head: the classifier size the ImageNet preset trains


@dataclass
class Device:
    name: str  # "cpu" or "cuda"
    precision: str  # "fp32" or "bf16"
    channels_last: bool

    def sync(self) -> None:
        if self.name == "cuda":
            torch.cuda.synchronize()

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.name, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_device(device: str, precision: str = "auto") -> Device:
    """`auto` picks the GPU when there is one; bf16 + channels-last is the GPU default."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MtScaleError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or auto")
    on_gpu = device == "cuda"
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    return Device(device, precision, channels_last=on_gpu)


def _preset_config(model_name: str, device: Device, batch_size: int, labeled: int):
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


def alternate(first: Callable[[], None], second: Callable[[], None], count: int, sync) -> tuple[float, float]:
    """Seconds spent in `count` calls of each, called in turns so a change in machine load hits both."""
    totals = [0.0, 0.0]
    for _ in range(count):
        for index, call in enumerate((first, second)):
            with Stopwatch(sync) as watch:
                call()
            totals[index] += watch.seconds
    return totals[0], totals[1]


# --------------------------------------------------------------------------- train


def bench_accelerator(device: Device):
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


def prepare_steps(cfg, accelerator, num_classes: int = NUM_CLASSES, steps_per_epoch: int = 1000) -> dict:
    """The three steps `mt-bench train` times, all mt_scale.step's function over one student and teacher:
    "mean_teacher" (cfg as given), "supervised" (no teacher forward, no EMA: the plain supervised step)
    and "supervised_baseline" (mt-train's mt.enabled=false, as mt-train runs it)."""
    import dataclasses

    from mt_scale.step import MeanTeacherStep, create_training

    parts = create_training(cfg, accelerator, num_classes, steps_per_epoch)
    baseline = dataclasses.replace(cfg, mt=dataclasses.replace(cfg.mt, enabled=False))
    return {
        "mean_teacher": MeanTeacherStep.create(cfg, accelerator, *parts),
        "supervised": MeanTeacherStep.create(cfg, accelerator, *parts, use_teacher=False),
        "supervised_baseline": MeanTeacherStep.create(baseline, accelerator, *parts),
    }


class StepBench:
    """The three steps of `prepare_steps` and one synthetic batch (uint8 views, L labeled rows) on the device."""

    def __init__(self, cfg, device: Device, image_size: int) -> None:
        self.cfg, self.device = cfg, device
        self.steps = prepare_steps(cfg, bench_accelerator(device))
        batch, labeled = cfg.data.batch_size, cfg.data.labeled_per_batch
        shape = (batch, 3, image_size, image_size)
        generator = torch.Generator().manual_seed(0)
        student = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        teacher = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
        labels = torch.where(torch.arange(batch) < labeled, labels, -1)
        self.batch = {"student": student, "teacher": teacher, "label": labels}
        self.batch = {key: value.to(device.name) for key, value in self.batch.items()}
        self.step_count = 0

    def run(self, name: str) -> int:
        """One step of kind `name`; returns the rows its student saw."""
        metrics = self.steps[name](self.batch, self.step_count)
        self.step_count = metrics.step
        return metrics.rows

    def supervised_step(self) -> None:
        self.run("supervised")

    def mean_teacher_step(self) -> None:
        self.run("mean_teacher")


def bench_train(
    model_name: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    labeled_per_batch: int | None = None,
    steps: int = 6,
    repeats: int = 3,
    device: str = "auto",
    precision: str = "auto",
) -> list[dict]:
    """Images/s of both steps and their time ratio (MT / supervised); the two step kinds alternate."""
    target = resolve_device(device, precision)
    on_gpu = target.name == "cuda"
    model_name = model_name or ("resnet152" if on_gpu else "resnet18")
    image_size = image_size or (224 if on_gpu else 64)
    labeled = labeled_per_batch or max(1, batch_size // 4)
    if not 1 <= labeled <= batch_size:
        raise MtScaleError(f"--labeled-per-batch {labeled}: must be in 1..--batch-size ({batch_size})")
    bench = StepBench(_preset_config(model_name, target, batch_size, labeled), target, image_size)
    warmup = 3 if on_gpu else 1  # first steps allocate memory and pick kernels
    alternate(bench.supervised_step, bench.mean_teacher_step, warmup, target.sync)
    supervised, mean_teacher, ratios = [], [], []
    for _ in tqdm(range(repeats), desc="train", unit="repeat"):
        sup_seconds, mt_seconds = alternate(
            bench.supervised_step, bench.mean_teacher_step, steps, target.sync
        )
        supervised.append(batch_size * steps / sup_seconds)
        mean_teacher.append(batch_size * steps / mt_seconds)
        ratios.append(mt_seconds / sup_seconds)
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
    }
    return [
        figure("train/supervised", "img/s", supervised, **detail),
        figure("train/mean_teacher", "img/s", mean_teacher, **detail),
        figure("train/step_ratio", "x", ratios, **detail),
    ]


# --------------------------------------------------------------------------- ema


def bench_ema(
    model_name: str = "resnet152", updates: int = 8, repeats: int = 3, device: str = "auto"
) -> list[dict]:
    """Milliseconds per EMA update, fused (`update_teacher`) vs the reference's loop, and the speedup."""
    from mt_scale.config import ModelConfig
    from mt_scale.model import create_model
    from mt_scale.teacher import create_teacher, ema_update_loop, update_teacher

    target = resolve_device(device)
    torch.manual_seed(0)
    student = create_model(ModelConfig(name=model_name, two_heads=False), NUM_CLASSES).to(target.name)
    teacher = create_teacher(student)
    parameters = sum(p.numel() for p in student.parameters())
    step = 10_000  # past the ramp: alpha = the decay, as for almost all of a run

    def fused_update() -> None:
        update_teacher(teacher, student, 0.999, step)

    def loop_update() -> None:
        ema_update_loop(teacher, student, 0.999, step)

    alternate(fused_update, loop_update, 1, target.sync)
    fused, loop, speedups = [], [], []
    for _ in tqdm(range(repeats), desc="ema", unit="repeat"):
        fused_seconds, loop_seconds = alternate(fused_update, loop_update, updates, target.sync)
        fused.append(fused_seconds * 1000 / updates)
        loop.append(loop_seconds * 1000 / updates)
        speedups.append(loop_seconds / fused_seconds)
    detail = {
        "model": model_name,
        "parameters": parameters,
        "tensors": len(list(student.parameters())),
        "updates": updates,
        "device": target.name,
    }
    return [
        figure("ema/fused_ms", "ms", fused, **detail),
        figure("ema/loop_ms", "ms", loop, **detail),
        figure("ema/speedup", "x", speedups, **detail),
    ]
