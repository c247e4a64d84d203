"""`mt-bench ema`: the fused EMA update (`teacher.update_teacher`) vs the reference's per-parameter loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mt_scale.bench.common import (
    NUM_CLASSES,
    DeviceOptions,
    alternate,
    figure,
    option,
    positive,
    resolve_device,
)


@dataclass
class EmaOptions(DeviceOptions):
    model: str = option("resnet152", "model whose parameters are averaged")
    updates: int = option(8, "timed updates of each kind per repeat", type=positive)


def run(options: EmaOptions, work_dir: Path) -> list[dict]:
    """Milliseconds per EMA update, fused vs loop, and the speedup (loop / fused), the two alternating."""
    import torch

    from mt_scale.config import ModelConfig
    from mt_scale.model import create_model
    from mt_scale.teacher import create_teacher, ema_update_loop, update_teacher

    target = resolve_device(options.device)
    torch.manual_seed(0)
    student = create_model(ModelConfig(name=options.model, two_heads=False), NUM_CLASSES).to(target.name)
    teacher = create_teacher(student)
    parameters = sum(p.numel() for p in student.parameters())
    step = 10_000  # past the ramp: alpha = the decay, as for almost all of a run

    def fused_update() -> None:
        update_teacher(teacher, student, 0.999, step)

    def loop_update() -> None:
        ema_update_loop(teacher, student, 0.999, step)

    alternate([fused_update, loop_update], 1, target.sync)
    fused, loop, speedups = [], [], []
    for _ in tqdm(range(options.repeats), desc="ema", unit="repeat"):
        fused_seconds, loop_seconds = alternate([fused_update, loop_update], options.updates, target.sync)
        fused.append(fused_seconds * 1000 / options.updates)
        loop.append(loop_seconds * 1000 / options.updates)
        speedups.append(loop_seconds / fused_seconds)
    detail = {
        "model": options.model,
        "parameters": parameters,
        "tensors": len(list(student.parameters())),
        "updates": options.updates,
        "device": target.name,
    }
    return [
        figure("ema/fused_ms", "ms", fused, **detail),
        figure("ema/loop_ms", "ms", loop, **detail),
        figure("ema/speedup", "x", speedups, **detail),
    ]
