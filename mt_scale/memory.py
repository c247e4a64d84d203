"""`run.max_device_batch: auto`: how many rows one device holds, measured once at start on the real model.

On a CUDA device the Mean Teacher step (teacher forward, student forward, losses, backward) runs on
random inputs at two small batch sizes on a fresh copy of the model; the growth of peak memory per row
and what is left of the device's memory give the rows that fit, with a margin. Elsewhere (CPU, MPS)
there is no device memory to size by: no limit. Every rank takes the smallest of the ranks' figures.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mt_scale.config import Config

MEMORY_FRACTION = 0.85  # of the device's total memory: room for the allocator's fragmentation and NCCL
PROBE_ROWS = (2, 6)


@dataclass(frozen=True)
class StepMemory:
    """Peak bytes of one step: `fixed` (weights, gradients, teacher, optimizer state) + `per_row` x rows."""

    fixed: float
    per_row: float

    def rows_within(self, budget: float) -> int:
        return max(1, int((budget - self.fixed) // self.per_row)) if self.per_row > 0 else 0


def device_batch_limit(
    cfg: Config, device: torch.device, num_classes: int,
    measure: Callable[[Config, torch.device, int], tuple[StepMemory, float]] | None = None,
) -> int | None:
    """The most rows per micro-batch `device` holds for `cfg`'s model and views; None = no limit.

    `measure` (for tests) returns (the step's memory, the device's total bytes); the default measures.
    """
    if device.type != "cuda":
        return None
    memory, total = (measure or measure_step_memory)(cfg, device, num_classes)
    return memory.rows_within(MEMORY_FRACTION * total) or None


def agreed_device_limit(cfg: Config, accelerator: Accelerator) -> int | None:
    """What `auto` measured, the smallest over the ranks; None when the setting is a number or off CUDA."""
    from shard_tools.manifest import read_manifest

    if cfg.run.max_device_batch != "auto" or accelerator.device.type != "cuda":
        return None
    num_classes = len(read_manifest(cfg.run.shards).classes)
    limit = device_batch_limit(cfg, accelerator.device, num_classes) or 0
    rows = int(accelerator.gather(torch.tensor([limit], device=accelerator.device)).min())  # at start only
    return rows or None


def measure_step_memory(cfg: Config, device: torch.device, num_classes: int) -> tuple[StepMemory, float]:
    """Peak memory of the Mean Teacher step at PROBE_ROWS rows on a fresh copy of the model."""
    from mt_scale.losses import mean_teacher_loss
    from mt_scale.model import create_model
    from pipelines.augment import get_spec

    height, width = get_spec(cfg.data.student_aug, get_spec(cfg.data.eval_aug).output_size).output_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.run.mixed_precision)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    student = create_model(cfg.model, num_classes).to(device, memory_format=memory_format)
    teacher = copy.deepcopy(student).requires_grad_(False)
    parameter_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    peaks = []
    for rows in PROBE_ROWS:
        student.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        images = torch.randn(rows, cfg.model.in_chans, height, width, device=device).to(memory_format=memory_format)
        labels = torch.zeros(rows, dtype=torch.long, device=device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            with torch.no_grad():
                teacher_out = teacher(images)
            losses = mean_teacher_loss(student(images), teacher_out, labels, consistency_weight=1.0,
                                       consistency=cfg.mt.consistency)  # fmt: skip
        losses["total"].backward()
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - start)
        del images, labels, teacher_out, losses
    per_row = (peaks[1] - peaks[0]) / (PROBE_ROWS[1] - PROBE_ROWS[0])
    # the peaks are taken above the probe's models: add the student, the teacher, SGD's momentum buffer
    # and DDP's gradient buckets, each the size of the parameters
    fixed = peaks[0] - per_row * PROBE_ROWS[0] + 4 * parameter_bytes
    del student, teacher
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
    return StepMemory(fixed=fixed, per_row=per_row), float(total)
