"""The shipped step (mt_scale.step) timed: at the preset's batch, the largest batch that fits, compiled."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from mt_scale.bench.gpu.common import release_memory, sync
from mt_scale.bench.gpu.plan import GOAL_MT_IMG_S, NUM_CLASSES, PRESET, Plan
from mt_scale.errors import MtScaleError

if TYPE_CHECKING:
    from mt_scale.bench.gpu.plan import Context


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether `exc` (or an exception it was raised from, as mt_scale.step's one-line error) is an OOM."""
    import torch

    seen = 0
    while exc is not None and seen < 5:
        text = str(exc).lower()
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def largest_batch(fits: Callable[[int], bool], start: int, cap: int) -> tuple[int, str]:
    """The largest batch for which `fits` is true: double from `start` until it fails (or passes `cap`),
    then bisect back between the last fit and the first failure to 1/8 of the batch (multiples of 8)."""
    if not fits(start):
        raise MtScaleError(
            f"a batch of {start} rows does not fit in this GPU's memory; lower data.batch_size"
        )
    good, size = start, start * 2
    while size <= cap and fits(size):
        good, size = size, size * 2
    if size > cap:
        return good, f"stopped at the cap of {cap} rows"
    failed = size
    while failed - good > max(8, good // 8):
        middle = (good + failed) // 2 // 8 * 8
        if middle <= good:
            break
        if fits(middle):
            good = middle
        else:
            failed = middle
    return good, f"{failed} rows ran out of memory"


@contextlib.contextmanager
def _compiler(plan: Plan) -> Iterator[None]:
    """torch.compile as mt-train applies it (mt_scale.model.compile_model); the dry run traces with dynamo's
    eager backend, since inductor's C++ build takes minutes on a small CPU."""
    import torch

    import mt_scale.model as model_module

    saved = model_module.compile_model
    if plan.compile_backend != "inductor":

        def compile_model(model: Any, cfg: Any) -> Any:
            return torch.compile(model, backend=plan.compile_backend) if cfg.compile else model

        model_module.compile_model = compile_model
    try:
        yield
    finally:
        model_module.compile_model = saved


def _accelerator(plan: Plan) -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=plan.dry_run, mixed_precision=plan.precision)


class StepRig:
    """Student, teacher, optimizer and schedule built as mt-train builds them (mt_scale.step), and the
    shipped step timed on synthetic uint8 views: Mean Teacher on a batch of L labeled + U unlabeled rows,
    and the same function with teacher forward + EMA off (the plain supervised step) on all-labeled rows."""

    def __init__(self, plan: Plan, compiled: bool) -> None:
        from mt_scale.step import create_training

        self.plan, self.compiled = plan, compiled
        self.accelerator = _accelerator(plan)
        with _compiler(plan):
            self.parts = create_training(
                self.config(plan.batch, plan.labeled), self.accelerator, NUM_CLASSES, steps_per_epoch=1000
            )
        self.step_index = 0
        self._steps: dict[int, tuple] = {}

    def config(self, batch: int, labeled: int) -> Any:
        from mt_scale.config import load_config

        return load_config(preset=PRESET, overrides=[
            f"model.name={self.plan.model}", "model.channels_last=true",
            f"model.compile={str(self.compiled).lower()}", f"run.mixed_precision={self.plan.precision}",
            "run.batch_scope=per_device", f"data.batch_size={batch}",
            f"data.labeled_per_batch={labeled}"])  # fmt: skip

    def steps(self, batch: int) -> tuple[Any, Any]:
        """(Mean Teacher step, plain supervised step) for `batch` rows, half of them labeled (built once)."""
        from mt_scale.step import MeanTeacherStep

        if batch not in self._steps:
            labeled = self.plan.labeled if batch == self.plan.batch else batch // 2
            cfg = self.config(batch, labeled)
            with _compiler(self.plan):
                self._steps[batch] = (
                    MeanTeacherStep.create(cfg, self.accelerator, *self.parts),
                    MeanTeacherStep.create(cfg, self.accelerator, *self.parts, use_teacher=False),
                )
        return self._steps[batch]

    def inputs(self, batch: int) -> tuple[dict, dict]:
        import torch

        labeled = self.plan.labeled if batch == self.plan.batch else batch // 2
        device, size = self.accelerator.device, self.plan.view_size
        torch.manual_seed(batch)
        views = {
            name: torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
            for name in ("student", "teacher")
        }
        labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
        mixed = torch.where(torch.arange(batch, device=device) < labeled, labels, -1)
        return {**views, "label": mixed}, {**views, "label": labels}

    def run(self, step: Any, inputs: dict, count: int) -> None:
        for _ in range(count):
            self.step_index = step(inputs, self.step_index).step

    def rates(self, batch: int) -> dict[str, dict]:
        """img/s, warm-up seconds and peak memory of both steps at `batch` rows (warm-up untimed)."""
        import torch

        mt_step, plain_step = self.steps(batch)
        mixed, all_labeled = self.inputs(batch)
        out = {}
        for name, step, inputs in (("mt", mt_step, mixed), ("supervised", plain_step, all_labeled)):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            self.run(step, inputs, self.plan.warmup_steps)
            sync()
            timed = time.perf_counter()
            self.run(step, inputs, self.plan.timed_steps)
            sync()
            seconds = time.perf_counter() - timed
            out[name] = {
                "img_s": batch * self.plan.timed_steps / seconds,
                "warmup_s": timed - start,
                "peak_gib": _peak_memory_gib(),
            }
        return out

    def fits(self, batch: int) -> bool:
        """Whether two Mean Teacher steps at `batch` rows run without running out of memory."""
        try:
            mixed, _ = self.inputs(batch)
            self.run(self.steps(batch)[0], mixed, 2)
            sync()
            return True
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        self._forget(batch)
        return False

    def _forget(self, batch: int) -> None:
        """After running out of memory at `batch`: drop its step, the gradients and the cached blocks."""
        self._steps.pop(batch, None)
        self.parts.optimizer.zero_grad(set_to_none=True)
        release_memory()

    def rates_backing_off(self, batch: int, tries: int = 4) -> tuple[int, dict]:
        """rates() at `batch`, or at 1/8 less each time it runs out of memory."""
        for _ in range(tries):
            try:
                return batch, self.rates(batch)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
            self._forget(batch)
            batch = max(8, batch * 7 // 8 // 8 * 8)
        raise MtScaleError(f"out of memory even at {batch} rows")


def _peak_memory_gib() -> float:
    """Peak GPU memory allocated since the last reset; on the CPU (dry run) the process's peak RSS."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _step_results(ctx: Context, suffix: str, batch: int, rates: dict, compiled: bool) -> None:
    goal = f">= {GOAL_MT_IMG_S:,.0f} img/s end to end"
    for name in ("mt", "supervised"):
        figure = rates[name]
        meets = figure["img_s"] >= GOAL_MT_IMG_S if name == "mt" else None
        ctx.report.result(
            f"gpu/{name}_step_img_s{suffix}",
            figure["img_s"],
            "img/s",
            goal=goal if name == "mt" else "",
            meets=meets,
            batch=batch,
            labeled=ctx.plan.labeled if batch == ctx.plan.batch else batch // 2,
            model=ctx.plan.model,
            precision=ctx.plan.precision,
            channels_last=True,
            compile=compiled,
            warmup_s=round(figure["warmup_s"], 2),
            peak_gib=round(figure["peak_gib"], 2),
        )


def part_steps(ctx: Context) -> None:
    """The step at the preset's batch, the largest batch that fits (doubling, then back off), eager."""
    plan = ctx.plan
    rig = StepRig(plan, compiled=False)
    _step_results(ctx, "", plan.batch, rig.rates(plan.batch), compiled=False)
    largest, why = largest_batch(rig.fits, plan.batch, plan.max_batch_cap)
    used, rates = rig.rates_backing_off(largest)
    ctx.max_batch = used
    ctx.report.result("gpu/max_batch", used, "rows", search=why, found=largest, model=plan.model)
    _step_results(ctx, "/max_batch", used, rates, compiled=False)
    ctx.report.result(
        "gpu/peak_mem_gib",
        rates["mt"]["peak_gib"],
        "GiB",
        batch=used,
        step="mean teacher",
        at_preset_batch=round(ctx.report.results["gpu/mt_step_img_s"]["detail"]["peak_gib"], 2),
        what="torch.cuda.max_memory_allocated" if plan.device == "cuda" else "process peak RSS (CPU)",
    )


def part_compile(ctx: Context) -> None:
    """The same with torch.compile (model.compile=true): the preset's batch, then the largest (budget)."""
    import torch._dynamo

    plan, report = ctx.plan, ctx.report
    keys = (
        "gpu/mt_step_img_s/compile",
        "gpu/supervised_step_img_s/compile",
        "gpu/compile_s",
        "gpu/mt_step_img_s/max_batch_compile",
        "gpu/supervised_step_img_s/max_batch_compile",
    )
    needed = 30.0 if plan.dry_run else 150.0
    if report.remaining() < needed:
        for key in keys:
            report.skip(
                key, f"{report.remaining():.0f} s of the budget left, compiling needs about {needed:.0f}"
            )
        return
    saved = torch._dynamo.config.automatic_dynamic_shapes
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per batch size, as in training
    try:
        rig = StepRig(plan, compiled=True)
        rates = rig.rates(plan.batch)
        _step_results(ctx, "/compile", plan.batch, rates, compiled=True)
        compile_s = rates["mt"]["warmup_s"] + rates["supervised"]["warmup_s"]
        report.result(
            "gpu/compile_s",
            compile_s,
            "s",
            what="warm-up of both compiled steps, compilation included",
            backend=plan.compile_backend,
            batch=plan.batch,
        )
        if ctx.max_batch is None or ctx.max_batch == plan.batch:
            for key in keys[3:]:
                report.skip(key, "no larger batch was found")
        elif report.remaining() < 1.3 * compile_s + 20:
            for key in keys[3:]:
                report.skip(
                    key, f"{report.remaining():.0f} s of the budget left, compiling took {compile_s:.0f} s"
                )
        else:
            used, rates = rig.rates_backing_off(ctx.max_batch)
            _step_results(ctx, "/max_batch_compile", used, rates, compiled=True)
    finally:
        torch._dynamo.config.automatic_dynamic_shapes = saved
