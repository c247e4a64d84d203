"""`mt-bench train --end-to-end`: the real training loop against the bare step on the same batches.

The loop is `mt_scale.train.train` on a packed set (by default the digits, packed as
`mt-shard pack digits --labels-per-class 5` packs them) with the preset's loaders and logging
cadence, no evaluation or checkpoint between epochs, one checkpoint at the end. Its rate is its own
report's `images_per_sec`: images seen / `train_seconds`, the seconds of the loop's batches from
asking the loader for each to the end of its step boundary (loading, the label check, the step, the
loss bookkeeping, log rows and the stop check); setup, the final evaluation, checkpoint and export
are not in it.

The bare step is the same `MeanTeacherStep`, built as the loop builds it, run over the same batches
from the same loader (fetched into memory first), for the same number of steps, timed from its
first step as the loop's rate is. `train/e2e_vs_step` = loop img/s / step img/s: the share of the
step's speed the whole loop keeps (loading, label checks, logging, the loop's bookkeeping).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from mt_scale.bench.common import Device, Stopwatch, figure
from mt_scale.errors import MtScaleError

if TYPE_CHECKING:
    from mt_scale.config import Config

DIGITS_LABELS_PER_CLASS = 5  # as `make demo` and docs/quickstart pack the digits


@dataclass(frozen=True)
class EndToEnd:
    """What the loop trains: a preset, optionally another model, a shard set (None: the digits), epochs."""

    preset: str = "digits-demo"
    model: str | None = None
    shards: Path | None = None
    epochs: int = 2
    backend: str | None = None  # data.backend; None: DALI on a GPU, the preset's elsewhere
    model_overrides: list[str] = field(default_factory=list)  # memory format, compile, CUDA graph


def loop_config(setup: EndToEnd, device: Device, shards: Path, output_dir: Path) -> Config:
    """The preset with the bench's model, device settings and set; no evaluation or checkpoint mid-run."""
    from mt_scale.config import load_config

    overrides = [
        f"run.shards={shards}", f"run.output_dir={output_dir}", f"run.epochs={setup.epochs}",
        "run.eval_every_epochs=0", "run.checkpoint_every_epochs=0", "run.keep_checkpoints=1",
        f"run.mixed_precision={'bf16' if device.precision == 'bf16' else 'no'}", *setup.model_overrides,
    ]  # fmt: skip
    if setup.model:
        overrides.append(f"model.name={setup.model}")
    backend = setup.backend or ("dali" if device.name == "cuda" else None)
    if backend:
        overrides.append(f"data.backend={backend}")
    return load_config(preset=setup.preset, overrides=overrides)


def packed_digits(work_dir: Path) -> Path:
    """The digits packed as a user packs them (`mt-shard pack digits DIR --labels-per-class 5`), once."""
    from shard_tools.manifest import read_manifest
    from shard_tools.pack import pack

    shards = work_dir / f"digits-{DIGITS_LABELS_PER_CLASS}-per-class"
    with contextlib.suppress(Exception):
        read_manifest(shards)
        return shards
    if shards.exists():
        shutil.rmtree(shards)  # half written by an earlier, interrupted run
    pack("digits", shards, labels_per_class=DIGITS_LABELS_PER_CLASS, seed=0, progress=False)
    return shards


@contextlib.contextmanager
def _on(device: Device) -> Iterator[None]:
    """mt-train's Accelerator on `device`: a fresh one, on the CPU even where a GPU is visible."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    saved = os.environ.get("ACCELERATE_USE_CPU")
    if device.name == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = saved
        AcceleratorState._reset_state(reset_partial_state=True)


def run_loop(cfg: Config, device: Device) -> dict:
    """mt_scale.train.train(cfg) in a fresh run folder; its report (steps, images_per_sec, ...)."""
    from mt_scale.train import train

    shutil.rmtree(cfg.run.output_dir, ignore_errors=True)
    with _on(device):
        result = train(cfg, progress=False)
    if not result.report.get("images_per_sec"):
        raise MtScaleError(f"{cfg.run.output_dir}: the loop trained no step; give --e2e-shards a larger set")
    return result.report


def time_bare_step(cfg: Config, device: Device, steps: int, device_limit: int | None = None) -> float:
    """Images/s of the loop's step alone over `steps` of the loop's own batches, held in memory.

    `device_limit` is the most rows per device the loop ran with (its report's plan), so the step
    is laid out in the same micro-batches."""
    import torch
    from accelerate import Accelerator

    from mt_scale.device_plan import resolve_for_devices
    from mt_scale.step import MeanTeacherStep, create_training
    from pipelines import build_loaders

    cfg = resolve_for_devices(cfg, 1, measured_limit=device_limit)
    with _on(device):
        accelerator = Accelerator(  # as mt_scale.train builds it, without the trackers
            mixed_precision=cfg.run.mixed_precision, gradient_accumulation_steps=cfg.run.grad_accum_steps,
            step_scheduler_with_optimizer=False,
        )  # fmt: skip
        loaders = build_loaders(cfg.run.shards, cfg.data)
        steps_per_epoch = len(loaders.train) // cfg.run.grad_accum_steps
        batches: list[dict] = []
        epoch = 0
        while len(batches) < steps * cfg.run.grad_accum_steps:  # the loop's batches, epoch after epoch
            loaders.set_epoch(epoch)
            for batch in loaders.train:
                batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            epoch += 1
        del batches[steps * cfg.run.grad_accum_steps :]
        parts = create_training(cfg, accelerator, loaders.num_classes, steps_per_epoch)
        step = MeanTeacherStep.create(cfg, accelerator, *parts)
        index, per_epoch = 0, steps_per_epoch * cfg.run.grad_accum_steps
        with Stopwatch(device.sync) as watch:
            for position, batch in enumerate(batches):
                index = step(batch, index, position / per_epoch).step
        return len(batches) * step.student_rows / watch.seconds


def time_end_to_end(setup: EndToEnd, device: Device, repeats: int, work_dir: Path, suffix: str = "") -> list[dict]:
    """`train/e2e_loop`, `train/e2e_step` (img/s) and `train/e2e_vs_step` (+ `suffix`), loop and step
    alternating."""
    shards = setup.shards or packed_digits(work_dir)
    cfg = loop_config(setup, device, shards, work_dir / "e2e-run")
    loop_rates, step_rates, ratios, steps = [], [], [], 0
    for _ in tqdm(range(repeats), desc=f"train end to end{suffix}", unit="repeat"):
        report = run_loop(cfg, device)
        steps = int(report["steps"])
        loop_rates.append(float(report["images_per_sec"]))
        step_rates.append(time_bare_step(cfg, device, steps, report.get("batch", {}).get("device_limit")))
        ratios.append(loop_rates[-1] / step_rates[-1])
    shutil.rmtree(cfg.run.output_dir, ignore_errors=True)
    detail = {
        "preset": setup.preset, "model": cfg.model.name, "shards": "digits" if setup.shards is None else str(shards),
        "epochs": setup.epochs, "steps": steps, "batch_size": cfg.data.batch_size,
        "labeled_per_batch": cfg.data.labeled_per_batch, "backend": cfg.data.backend, "workers": cfg.data.workers,
        "log_every_steps": cfg.run.log_every_steps, "device": device.name, "precision": device.precision,
        "compile": cfg.model.compile, "cuda_graph": cfg.model.cuda_graph,
        "loop_rate": "report.json images_per_sec (images_seen / train_seconds)",
        "step_rate": "the same steps over batches held in memory, timed from the first step",
    }  # fmt: skip
    return [
        figure(f"train/e2e_loop{suffix}", "img/s", loop_rates, **detail),
        figure(f"train/e2e_step{suffix}", "img/s", step_rates, **detail),
        figure(f"train/e2e_vs_step{suffix}", "x", ratios, **detail),
    ]
