"""Optimizer (timm's factory, by name) and the reference's LR schedule as a per-step LambdaLR.

`learning_rate(optim, epoch)` is the reference's LR at a fractional epoch; the scheduler evaluates
it at step / steps_per_epoch, stepped after each optimizer step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import timm.optim
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from mt_scale.errors import MtScaleError
from mt_scale.losses import cosine_rampdown, linear_rampup

if TYPE_CHECKING:
    from mt_scale.config import OptimConfig

_MOMENTUM_OPTIMIZERS = ("sgd", "momentum", "nesterov")


def create_optimizer(cfg: OptimConfig, model: nn.Module) -> Optimizer:
    """timm's `create_optimizer_v2(cfg.name, ...)`; for "sgd", `cfg.nesterov` picks Nesterov or not.

    Weight decay applies to every parameter, biases and BN included, as the reference's
    torch.optim.SGD does, unless `cfg.filter_bias_and_bn` (timm's habit) is set.
    """
    if cfg.name not in timm.optim.list_optimizers():
        raise MtScaleError(
            f"optim.name={cfg.name!r} is not a timm optimizer; choose one of timm.optim.list_optimizers() "
            "(the reference uses sgd with optim.nesterov=true)"
        )
    extra = {"nesterov": cfg.nesterov} if cfg.name in _MOMENTUM_OPTIMIZERS else {}
    return timm.optim.create_optimizer_v2(
        model,
        opt=cfg.name,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        filter_bias_and_bn=cfg.filter_bias_and_bn,
        **extra,
    )


def create_scheduler(cfg: OptimConfig, optimizer: Optimizer, steps_per_epoch: int) -> LambdaLR:
    """A LambdaLR whose factor times `cfg.lr` is the reference's LR at step / steps_per_epoch.

    Every parameter group's base LR is set to `cfg.lr` first, so the factor is absolute.
    """
    if steps_per_epoch < 1:
        raise MtScaleError(f"steps_per_epoch={steps_per_epoch}: the training loader yields no full step")
    if cfg.lr <= 0:
        raise MtScaleError(f"optim.lr={cfg.lr}: must be > 0 (the schedule is relative to it)")
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
        group["initial_lr"] = cfg.lr

    def factor(step: int) -> float:
        return learning_rate(cfg, step / steps_per_epoch) / cfg.lr

    return LambdaLR(optimizer, factor)


def learning_rate(optim: OptimConfig, epoch: float) -> float:
    """The reference's LR at fractional `epoch` (= epoch + step_in_epoch / steps_per_epoch).

    Linear ramp from `initial_lr` to `lr` over `lr_rampup_epochs`, then (when
    `lr_rampdown_epochs` > 0) times one cosine half cycle of length `lr_rampdown_epochs`.
    With `optim.schedule_per_step` False the LR changes only at epoch boundaries.
    """
    position = epoch if optim.schedule_per_step else math.floor(epoch)
    lr = linear_rampup(position, optim.lr_rampup_epochs) * (optim.lr - optim.initial_lr) + optim.initial_lr
    if optim.lr_rampdown_epochs:
        lr *= cosine_rampdown(position, optim.lr_rampdown_epochs)
    return lr
