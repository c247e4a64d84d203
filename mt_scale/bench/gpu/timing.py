"""The loader, the EMA update and the step fed by the loader (end to end) timed; whether the loader keeps up."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from mt_scale.bench.gpu.common import data_config, forever, sync
from mt_scale.bench.gpu.data import repeated_photo_shards
from mt_scale.bench.gpu.plan import GOAL_EMA_X, GOAL_LOADER_X, GOAL_MT_IMG_S, NUM_CLASSES
from mt_scale.bench.gpu.steps import StepRig, is_out_of_memory

if TYPE_CHECKING:
    from mt_scale.bench.gpu.plan import Context


def part_loader(ctx: Context) -> None:
    """Two-view DALI batches of the preset's size per second, delivered on the training device."""
    from pipelines import build_loaders

    plan = ctx.plan
    loaders = build_loaders(ctx.need_data().photo_shards, data_config(plan), backend="dali")
    stream = forever(loaders.train)
    for _ in range(plan.loader_warmup):
        next(stream)
    sync()
    start, rows = time.perf_counter(), 0
    for _ in range(plan.loader_batches):
        rows += int(next(stream)["student"].shape[0])
    sync()
    rate = rows / (time.perf_counter() - start)
    ctx.report.result(
        "gpu/loader_img_s",
        rate,
        "img/s",
        goal=f">= {GOAL_LOADER_X:g}x the step's demand",
        batch=plan.batch,
        labeled=plan.labeled,
        threads=plan.loader_workers,
        batches=plan.loader_batches,
        images=plan.photos,
        image_size=list(plan.photo_size),
        device=plan.device,
    )


def part_ema(ctx: Context) -> None:
    """Milliseconds per teacher update on the model's parameters: the fused update vs a per-tensor loop."""
    import statistics

    from mt_scale.config import ModelConfig
    from mt_scale.model import create_model
    from mt_scale.teacher import create_teacher, ema_update_loop, update_teacher

    plan = ctx.plan
    student = create_model(ModelConfig(name=plan.ema_model, two_heads=False), NUM_CLASSES).to(plan.device)
    teacher = create_teacher(student)

    def block(update: Callable[..., float]) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(plan.ema_updates):
            update(teacher, student, 0.999, 10_000)  # past the ramp: alpha is the decay
        sync()
        return (time.perf_counter() - start) * 1000 / plan.ema_updates

    block(update_teacher), block(ema_update_loop)  # warm-up
    fused, loop = [], []
    for _ in range(plan.ema_blocks):  # interleaved, so a change in load hits both
        fused.append(block(update_teacher))
        loop.append(block(ema_update_loop))
    fused_ms, loop_ms = statistics.median(fused), statistics.median(loop)
    detail = {
        "model": plan.ema_model,
        "tensors": len(list(student.parameters())),
        "device": plan.device,
        "parameters": sum(p.numel() for p in student.parameters()),
    }
    goal = f"fused >= {GOAL_EMA_X:g}x faster than the loop"
    ctx.report.result("gpu/ema_fused_ms", fused_ms, "ms", goal=goal, **detail)
    ctx.report.result("gpu/ema_loop_ms", loop_ms, "ms", goal=goal, **detail)
    ctx.report.result(
        "gpu/ema_speedup",
        loop_ms / fused_ms,
        "x",
        goal=f">= {GOAL_EMA_X:g}x",
        meets=loop_ms / fused_ms >= GOAL_EMA_X,
        **detail,
    )


def _end_to_end(ctx: Context, rig: StepRig, batch: int) -> float:
    from pipelines import build_loaders

    plan = ctx.plan
    labeled = plan.labeled if batch == plan.batch else batch // 2
    cfg = data_config(plan, batch_size=batch, labeled_per_batch=labeled)
    shards = repeated_photo_shards(ctx, batch - labeled)
    stream = forever(build_loaders(shards, cfg, backend="dali").train)
    step = rig.steps(batch)[0]
    steps = max(plan.e2e_steps * plan.batch // batch, 15)  # about as many images at any batch
    for _ in range(plan.e2e_warmup):
        rig.step_index = step(next(stream), rig.step_index).step
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        rig.step_index = step(next(stream), rig.step_index).step
    sync()
    return batch * steps / (time.perf_counter() - start)


def part_end_to_end(ctx: Context) -> None:
    """The Mean Teacher step fed by the DALI loader (decode + two views + step), eager: the issue's goal.

    At the preset's per-device batch (40), at its whole batch on one device (400: `--set
    run.max_device_batch=400`, what one GPU with the memory for it runs), and near the largest batch.
    """
    plan = ctx.plan
    rig = StepRig(plan, compiled=False)
    goal = f">= {GOAL_MT_IMG_S:,.0f} img/s (one H100)"
    batches = {"gpu/mt_end_to_end_img_s": plan.batch, "gpu/mt_end_to_end_img_s/global_batch": plan.global_batch}
    if ctx.max_batch and ctx.max_batch > plan.global_batch:
        batches["gpu/mt_end_to_end_img_s/max_batch"] = ctx.max_batch * 7 // 8 // 8 * 8 or ctx.max_batch
    for name, batch in batches.items():  # DALI's buffers need room too: 7/8 of the largest batch
        try:
            rate = _end_to_end(ctx, rig, batch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            ctx.report.skip(name, f"out of memory at {batch} rows beside DALI")
            continue
        labeled = plan.labeled if batch == plan.batch else batch // 2
        ctx.report.result(name, rate, "img/s", goal=goal, meets=rate >= GOAL_MT_IMG_S, batch=batch,
                          labeled=labeled, threads=plan.loader_workers, compile=False)  # fmt: skip


def part_summary(ctx: Context) -> None:
    """Whether the loader keeps up: its rate over the fastest Mean Teacher step at the same batch."""
    results = ctx.report.results
    demands = [
        results[k]["value"]
        for k in ("gpu/mt_step_img_s", "gpu/mt_step_img_s/compile")
        if results.get(k, {}).get("value")
    ]
    loader = results.get("gpu/loader_img_s", {}).get("value")
    if not demands or not loader:
        ctx.report.skip("gpu/loader_keeps_up", "needs the loader and step figures", "x")
        return
    ratio = loader / max(demands)
    ctx.report.result(
        "gpu/loader_keeps_up",
        ratio,
        "x",
        goal=f">= {GOAL_LOADER_X:g}x",
        meets=ratio >= GOAL_LOADER_X,
        keeps_up=ratio >= GOAL_LOADER_X,
        loader_img_s=round(loader, 1),
        demand_img_s=round(max(demands), 1),
        batch=ctx.plan.batch,
    )
