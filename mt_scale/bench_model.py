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


class StepBench:
    """A student, its teacher and optimizer, and one synthetic batch; times supervised and MT steps.

    mt_scale.train keeps its step inline in the loop (no reusable function), so the Mean Teacher step
    here is composed from the same core calls in the same order: normalise both views on the device,
    teacher forward (no gradients), student forward, `losses.mean_teacher_loss`, backward, optimizer
    step, zero_grad, LR-scheduler step, `teacher.update_teacher`. Accelerate is left out (one process:
    its backward is loss.backward()). The supervised step is what a user would otherwise run: the
    same student on an all-labeled batch of the same size, with no teacher.
    """

    def __init__(self, cfg, device: Device, image_size: int) -> None:
        from mt_scale.model import create_model
        from mt_scale.optim import create_optimizer, create_scheduler
        from mt_scale.teacher import create_teacher

        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.student = create_model(cfg.model, NUM_CLASSES).to(device.name).train()
        self.teacher = create_teacher(self.student)
        self.optimizer = create_optimizer(cfg.optim, self.student)
        self.scheduler = create_scheduler(cfg.optim, self.optimizer, steps_per_epoch=1000)
        batch, labeled = cfg.data.batch_size, cfg.data.labeled_per_batch
        shape = (batch, 3, image_size, image_size)
        generator = torch.Generator().manual_seed(0)
        self.student_view = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(
            device.name
        )
        self.teacher_view = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).to(
            device.name
        )
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
        self.all_labeled = labels.to(device.name)
        self.mixed_labels = torch.where(torch.arange(batch) < labeled, labels, -1).to(device.name)
        self.step_count = 0

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        from pipelines import normalize

        data = self.cfg.data
        return normalize(images, data.mean, data.std, channels_last=self.device.channels_last)

    def _finish(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_count += 1

    def supervised_step(self) -> None:
        from mt_scale.losses import class_loss

        with self.device.autocast():
            class_logits, _ = self.student(self._inputs(self.student_view))
            loss = class_loss(class_logits, self.all_labeled) / self.all_labeled.shape[0]
        self._finish(loss)

    def mean_teacher_step(self) -> None:
        from mt_scale.losses import mean_teacher_loss
        from mt_scale.teacher import update_teacher

        mt = self.cfg.mt
        student_in = self._inputs(self.student_view)
        teacher_in = self._inputs(self.teacher_view)
        with torch.no_grad(), self.device.autocast():
            teacher_out = self.teacher(teacher_in)
        with self.device.autocast():
            student_out = self.student(student_in)
            losses = mean_teacher_loss(
                student_out,
                teacher_out,
                self.mixed_labels,
                consistency_weight=mt.consistency_weight,
                consistency=mt.consistency,
                logit_distance_cost=mt.logit_distance_cost,
            )
        self._finish(losses["total"])
        update_teacher(self.teacher, self.student, mt.ema_decay, self.step_count)


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
