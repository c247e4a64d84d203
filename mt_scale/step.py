"""The one Mean Teacher training step: what mt-train's loop runs and what `mt-bench train` times.

    parts = create_training(cfg, accelerator, num_classes, steps_per_epoch)
    step = MeanTeacherStep.create(cfg, accelerator, *parts)
    metrics = step(batch, step_index)  # batch: {"student", "teacher": uint8 N,3,H,W; "label": int64}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from mt_scale.errors import MtScaleError
from mt_scale.graph import Replayed, StepGraphs, graph_unsupported
from mt_scale.losses import consistency_weight, mean_teacher_loss
from mt_scale.teacher import move_towards_student, update_teacher

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mt_scale.config import Config, MeanTeacherConfig


class TrainingParts(NamedTuple):
    """What one step updates: the prepared student, its EMA teacher, the optimizer and LR schedule."""

    student: nn.Module
    teacher: nn.Module
    optimizer: Optimizer
    scheduler: LRScheduler


def create_training(
    cfg: Config, accelerator: Accelerator, num_classes: int, steps_per_epoch: int
) -> TrainingParts:
    """The student (prepared by Accelerate, then compiled if `model.compile`), teacher, optimizer, schedule.

    The student starts from `run.seed` on every rank; afterwards the seeds differ per rank (dropout).
    """
    from accelerate.utils import set_seed

    from mt_scale.model import compile_model, create_model
    from mt_scale.optim import create_optimizer, create_scheduler
    from mt_scale.teacher import create_teacher

    set_seed(cfg.run.seed)
    student = create_model(cfg.model, num_classes)
    optimizer = create_optimizer(cfg.optim, student)
    scheduler = create_scheduler(cfg.optim, optimizer, steps_per_epoch)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    student = compile_model(student, cfg.model)
    teacher = create_teacher(student).to(accelerator.device)
    set_seed(cfg.run.seed, device_specific=True)
    student.train()
    teacher.train()
    return TrainingParts(student, teacher, optimizer, scheduler)


@dataclass
class StepMetrics:
    """What one call of a step did: the detached loss terms (LOSS_NAMES), the weight, the step count."""

    losses: dict[str, torch.Tensor]
    consistency_weight: float
    step: int  # optimizer steps done after this batch
    stepped: bool  # this batch ended an optimizer step (false inside a gradient accumulation)
    rows: int  # rows the student saw on this rank


@dataclass
class MeanTeacherStep:
    """One batch: normalise, teacher forward (no grad), student forward, losses, backward, optimizer
    and LR-schedule step, EMA update; gradient accumulation through `accelerator.accumulate`.

    Build it with `MeanTeacherStep.create(cfg, accelerator, student, teacher, optimizer, scheduler)`
    from parts an Accelerator prepared (`create_training` makes them as mt-train does), then call
    `step(batch, step_index, epoch=None)` per batch. `batch` holds "student" and "teacher" views
    (uint8 N,3,H,W) and "label" (int64, -1 = unlabeled, the labeled rows first), on any device.
    `step_index` is the optimizer steps done so far; `epoch` the fractional epoch that sets the
    consistency ramp (None: past the ramp, the full `mt.consistency_weight`). Returns StepMetrics.

    The same function runs three ways:
    - Mean Teacher (`mt.enabled`): the student sees every row, the teacher its own view.
    - mt-train's supervised baseline (`mt.enabled=false`): exactly as mt-train runs it, the student
      and teacher see the labeled rows only, the consistency weight is 0, the teacher still follows.
    - `use_teacher=False`: no teacher forward and no EMA update, the plain supervised step a user
      would otherwise run (class loss, plus the logit distance of two heads).
    """

    accelerator: Accelerator
    student: nn.Module
    teacher: nn.Module | None
    teacher_forward: nn.Module | None  # the teacher, compiled when `model.compile`; never DDP-wrapped
    optimizer: Optimizer
    scheduler: LRScheduler
    mt: MeanTeacherConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels_last: bool
    student_rows: int  # rows of each batch the models see (the labeled ones in the supervised baseline)
    batch_size: int
    graphs: StepGraphs | None = None  # the step captured as CUDA graphs (model.cuda_graph), else eager
    eager_reason: str = "model.cuda_graph=false"

    @classmethod
    def create(
        cls,
        cfg: Config,
        accelerator: Accelerator,
        student: nn.Module,
        teacher: nn.Module | None,
        optimizer: Optimizer,
        scheduler: LRScheduler,
        *,
        use_teacher: bool = True,
    ) -> MeanTeacherStep:
        """The step for `cfg` (this rank's resolved config) over parts the accelerator prepared."""
        from mt_scale.model import compile_model

        if use_teacher and teacher is None:
            raise ValueError("use_teacher=True needs a teacher (mt_scale.teacher.create_teacher)")
        teacher = teacher if use_teacher else None
        step = cls(
            accelerator=accelerator,
            student=student,
            teacher=teacher,
            teacher_forward=compile_model(teacher, cfg.model) if teacher is not None else None,
            optimizer=optimizer,
            scheduler=scheduler,
            mt=cfg.mt,
            mean=tuple(cfg.data.mean),
            std=tuple(cfg.data.std),
            channels_last=bool(cfg.model.channels_last),
            student_rows=cfg.data.batch_size if cfg.mt.enabled else cfg.data.labeled_per_batch,
            batch_size=cfg.data.batch_size,
        )
        if cfg.model.cuda_graph:
            step.eager_reason = graph_unsupported(step, cfg) or ""
            if not step.eager_reason:
                step.graphs = StepGraphs(step)
        return step

    def weight(self, epoch: float | None) -> float:
        """The consistency weight at `epoch` (0 without a teacher or with mt.enabled=false)."""
        if self.teacher is None:
            return 0.0
        if epoch is None:
            return self.mt.consistency_weight if self.mt.enabled else 0.0
        return consistency_weight(self.mt, epoch)

    def __call__(
        self, batch: Mapping[str, torch.Tensor], step_index: int, epoch: float | None = None
    ) -> StepMetrics:
        weight = self.weight(epoch)
        if self.graphs is not None:
            out = self.graphs(batch, step_index, weight)
            if isinstance(out, Replayed):
                return StepMetrics(out.losses, weight, out.step, out.stepped, self.student_rows)
            if out is not None:
                return out
        return self.eager(batch, step_index, weight)

    @property
    def mode(self) -> str:
        """How the step runs, for the line mt-train prints at start."""
        return self.graphs.mode if self.graphs is not None else f"eager ({self.eager_reason})"

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rows the models see, on the device: "student", "teacher" (with a teacher), "label"."""
        names = ("student", "teacher", "label") if self.teacher_forward is not None else ("student", "label")
        device = self.accelerator.device
        return {name: batch[name][: self.student_rows].to(device, non_blocking=True) for name in names}

    def eager(self, batch: Mapping[str, torch.Tensor], step_index: int, weight: float) -> StepMetrics:
        """The step as plain PyTorch calls (what a CUDA graph captures, and the path off CUDA)."""
        try:
            with self.accelerator.accumulate(self.student):
                losses = self.compute(self.inputs(batch), weight)
        except RuntimeError as exc:
            raise memory_error(exc, self.batch_size) from None
        stepped = self.accelerator.sync_gradients
        if stepped:
            self.scheduler.step()
            step_index += 1
            if self.teacher is not None and self.graphs is not None:
                move_towards_student(self.teacher, self.student, self.graphs.fill_alpha(step_index))
            elif self.teacher is not None:
                update_teacher(self.teacher, self.student, self.mt.ema_decay, step_index)
        return StepMetrics(losses, weight, step_index, stepped, self.student_rows)

    def compute(
        self, inputs: Mapping[str, torch.Tensor], weight: float | torch.Tensor,
        ema_alpha: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Normalise, teacher forward (no grad), student forward, losses, backward, optimizer step; with
        `ema_alpha` (a CUDA graph's) also the EMA update. Inside `accelerator.accumulate`."""
        from pipelines import normalize

        student_in = normalize(inputs["student"], self.mean, self.std, channels_last=self.channels_last)
        teacher_out = None
        if self.teacher_forward is not None:
            teacher_in = normalize(inputs["teacher"], self.mean, self.std, channels_last=self.channels_last)
            # Autocast here: the teacher is not prepared by Accelerate (the student's forward is).
            # In train mode this pass also updates the teacher's BatchNorm statistics.
            with torch.no_grad(), self.accelerator.autocast():
                teacher_out = self.teacher_forward(teacher_in)
        student_out = self.student(student_in)
        losses = mean_teacher_loss(
            student_out,
            teacher_out,
            inputs["label"],
            consistency_weight=weight,
            consistency=self.mt.consistency,
            logit_distance_cost=self.mt.logit_distance_cost,
        )
        self.accelerator.backward(losses["total"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if ema_alpha is not None and self.teacher is not None and self.accelerator.sync_gradients:
            move_towards_student(self.teacher, self.student, ema_alpha)
        return {name: value.detach() for name, value in losses.items()}


def memory_error(exc: RuntimeError, batch_size: int) -> Exception:
    """Out of memory (CUDA or CPU) as one MtScaleError saying what to lower; any other error as it is."""
    text = str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return MtScaleError(
            f"out of memory with data.batch_size={batch_size} per device: lower data.batch_size "
            f"(and data.labeled_per_batch) and raise run.grad_accum_steps to keep the effective batch"
        )
    return exc
