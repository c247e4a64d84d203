"""The EMA teacher: a gradient-free copy of the student whose weights average the student's.

After each optimizer step `update_teacher(teacher, student, ema_decay, step)` moves every parameter
with one fused foreach lerp, alpha = min(1 - 1/(step + 1), ema_decay). BatchNorm statistics are the
teacher's own (its train-mode forward passes). They are averaged over ranks where they are read
(evaluation, checkpoint, export) by `average_buffers_over_ranks`, not after every step: a running mean or
variance is an EMA of batch statistics, so the mean over ranks of the EMAs is the EMA of the rank
means, and averaging when read gives the teacher that averaging every step would, with no collective
per step (docs/design.md: training).
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.distributed as dist
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under any DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`) layers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def create_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of the (unwrapped) student in train mode, float32, with requires_grad off."""
    teacher = copy.deepcopy(unwrap_model(student))
    for param in teacher.parameters():
        param.requires_grad_(False)
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    teacher.train()  # the reference keeps the teacher in train mode while training (see docstring)
    return teacher


_PAIRS: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref, list[torch.Tensor], list[torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def ema_alpha(decay: float, step: int) -> float:
    """The teacher's keep-fraction after optimizer step `step` (1-based): min(1 - 1/(step+1), decay)."""
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> float:
    """Move the teacher's parameters towards the student's; returns the alpha used.

    `step` is the optimizer step count AFTER the step just taken (1 after the first step). No
    collective and no host read: the buffers are averaged where they are read (`average_buffers_over_ranks`).
    """
    alpha = ema_alpha(decay, step)
    move_towards_student(teacher, student, alpha)
    return alpha


@torch.no_grad()
def move_towards_student(teacher: nn.Module, student: nn.Module, alpha: float | torch.Tensor) -> None:
    """teacher = alpha * teacher + (1 - alpha) * student over every parameter, in fused foreach ops.

    `alpha` is a float, or a 0-dim tensor on the device that a CUDA graph replays with the value
    filled in before each replay.
    """
    teacher_params, student_params = _paired_parameters(teacher, student)
    if isinstance(alpha, torch.Tensor):
        # foreach lerp takes its weight as a host scalar only; sub, mul by a tensor, add stay on the device
        steps = torch._foreach_sub(student_params, teacher_params)
        torch._foreach_mul_(steps, 1.0 - alpha)
        torch._foreach_add_(teacher_params, steps)
    elif all(s.dtype == t.dtype for s, t in zip(student_params, teacher_params, strict=True)):
        # lerp_(end, weight): t + weight * (s - t) = alpha * t + (1 - alpha) * s
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - alpha)
    else:
        # low-precision student: add_ promotes in-kernel, so no fp32 copies of the student are made
        torch._foreach_mul_(teacher_params, alpha)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - alpha)


@torch.no_grad()
def ema_update_loop(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> float:
    """The reference's per-parameter update (`mul_` then `add_` per tensor); for tests and mt-bench."""
    alpha = ema_alpha(decay, step)
    for teacher_param, student_param in zip(
        teacher.parameters(), unwrap_model(student).parameters(), strict=True
    ):
        teacher_param.mul_(alpha).add_(student_param, alpha=1.0 - alpha)
    return alpha


@torch.no_grad()
def average_buffers_over_ranks(module: nn.Module) -> None:
    """Average any module's floating-point buffers (BatchNorm statistics) over all ranks; a no-op in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for buffer in buffers:
        buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()


def _paired_parameters(
    teacher: nn.Module, student: nn.Module
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The two models' parameter lists, taken once per (teacher, student) pair and kept with the teacher.

    Walking resnet152's modules for its 467 parameters costs about as much host time as the fused update
    itself; parameters are updated in place (optimizer steps, `load_state_dict`, `.to()`), so the lists
    stay valid for the pair's life.
    """
    teacher, student = unwrap_model(teacher), unwrap_model(student)
    cached = _PAIRS.get(teacher)
    if cached is not None and cached[0]() is student:
        return cached[1], cached[2]
    teacher_params, student_params = list(teacher.parameters()), list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError(
            f"teacher has {len(teacher_params)} parameter tensors, student {len(student_params)}: "
            "build the teacher with create_teacher(student)"
        )
    _PAIRS[teacher] = (weakref.ref(student), teacher_params, student_params)
    return teacher_params, student_params
