"""How one optimizer step's batch is laid over the devices: per-device micro-batch, accumulation, LR.

`run.batch_scope: global` keeps the paper's batch and LR on any device count; `run.max_device_batch`
(a number, or `auto`: what mt_scale.memory measured on the device) bounds the micro-batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mt_scale.config import Config
from mt_scale.errors import MtScaleError


@dataclass(frozen=True)
class DevicePlan:
    """How one optimizer step's batch is laid over the devices (what report.json records)."""

    world_size: int
    grad_accum_steps: int
    device_batch: int  # rows per device per micro-batch
    labeled_per_rank: tuple[int, ...]  # labeled rows per micro-batch, rank by rank
    global_batch: int  # rows per optimizer step over all devices
    global_labeled: int
    lr: float  # the peak LR the run uses
    device_limit: int | None = None  # most rows a device may take (run.max_device_batch), None = no cap
    batchnorm_rows: int = 0  # rows one BatchNorm forward normalises over on a device (the student's)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "labeled_per_rank": list(self.labeled_per_rank)}

    def summary(self) -> str:
        """The line mt-train prints at start."""
        limit = f"at most {self.device_limit}" if self.device_limit else "no limit"
        return (f"batch: {self.global_batch} per step ({self.global_labeled} labeled) = {self.world_size} "
                f"devices x {self.grad_accum_steps} micro-batches x {self.device_batch} ({limit} per device); "
                f"BatchNorm over {self.batchnorm_rows} rows per device; peak lr {self.lr:g}")  # fmt: skip


def explicit_device_limit(cfg: Config) -> int | None:
    """run.max_device_batch as a row count when the user set one (None for auto or 0 = no cap)."""
    setting = cfg.run.max_device_batch
    return None if setting == "auto" else (int(setting) or None)


def plan_devices(cfg: Config, world_size: int, measured_limit: int | None = None) -> DevicePlan:
    """The per-device batch, accumulation and LR that run `cfg` on `world_size` devices.

    Global scope: the smallest accumulation (at least run.grad_accum_steps) that splits the global
    batch evenly over devices and micro-batches within the device limit, with the labeled rows of a
    micro-batch spread over ranks (floor or ceil each, the exact global count in total). Every rank has
    the same batch size, so DDP's gradient mean is the mean over the global batch. The limit is
    run.max_device_batch when it is a number, else `measured_limit` (what `auto` measured on the
    device; None: no cap).
    """
    if world_size < 1:
        raise MtScaleError(f"world_size={world_size}: must be >= 1")
    batch, labeled, accum = cfg.data.batch_size, cfg.data.labeled_per_batch, cfg.run.grad_accum_steps
    limit = explicit_device_limit(cfg) if cfg.run.max_device_batch != "auto" else measured_limit
    if cfg.run.batch_scope == "per_device":
        return DevicePlan(world_size, accum, batch, (labeled,) * world_size, batch * world_size * accum,
                          labeled * world_size * accum, cfg.optim.lr * world_size * accum, limit,
                          batch if cfg.mt.enabled else labeled)  # fmt: skip
    cap = limit or batch
    for steps in range(accum, batch + 1):
        if batch % (world_size * steps) or labeled % steps or batch // (world_size * steps) > cap:
            continue
        device_batch, micro_labeled = batch // (world_size * steps), labeled // steps
        per_rank = tuple(micro_labeled // world_size + (rank < micro_labeled % world_size)
                         for rank in range(world_size))
        if min(per_rank) < 1 or max(per_rank) > device_batch:
            continue
        return DevicePlan(world_size, steps, device_batch, per_rank, batch, labeled, cfg.optim.lr, limit,
                          device_batch if cfg.mt.enabled else max(per_rank))  # fmt: skip
    raise MtScaleError(
        f"run.batch_scope=global: a batch of {batch} rows ({labeled} labeled) cannot be split evenly over "
        f"{world_size} devices within {limit or batch} rows per device (run.max_device_batch="
        f"{cfg.run.max_device_batch}); use a device count "
        "that divides data.batch_size, change the batch, or set run.batch_scope=per_device"
    )


def resolve_for_devices(
    cfg: Config, world_size: int, rank: int = 0, measured_limit: int | None = None
) -> Config:
    """A copy of `cfg` with what `rank` of `world_size` runs: per-device batch, accumulation, peak LR."""
    plan = plan_devices(cfg, world_size, measured_limit)
    data = dataclasses.replace(cfg.data, batch_size=plan.device_batch,
                               labeled_per_batch=plan.labeled_per_rank[rank])
    run = dataclasses.replace(cfg.run, grad_accum_steps=plan.grad_accum_steps)
    optim = dataclasses.replace(cfg.optim, lr=plan.lr)
    return dataclasses.replace(cfg, data=data, run=run, optim=optim)
