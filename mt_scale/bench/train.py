"""`mt-bench train`: mt_scale.step's function timed three ways on one synthetic batch, and the real loop.

The Mean Teacher step; the same function with the teacher forward and EMA update off (the plain
supervised step a user would otherwise run; `train/step_ratio` = MT / this); and mt-train's
supervised baseline (mt.enabled=false, as mt-train runs it). Synthetic uint8 batches on the device
isolate compute from data loading (`mt-bench pipeline` measures that). `--max-batch` also measures
at the largest batch that fits the device; `--compile` and `--cuda-graph`/`--no-cuda-graph` set the
model's `compile` and `cuda_graph` fields (on a GPU without either, the step is timed graphed and
eager, `/eager` figures, and `train/graph_speedup` = graphed / eager Mean Teacher rate);
`--end-to-end` compares the whole loop with the bare step (mt_scale.bench.end_to_end).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from mt_scale.bench.common import (
    NUM_CLASSES,
    Device,
    DeviceOptions,
    alternate,
    figure,
    option,
    positive,
    resolve_device,
)
from mt_scale.errors import MtScaleError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mt_scale.config import Config
    from mt_scale.step import MeanTeacherStep

# The figure of each way the step runs, in the order they alternate.
KINDS = ("supervised", "mean_teacher", "supervised_baseline")
MAX_BATCH_CAP = 4096  # the search for the largest batch stops doubling here


@dataclass
class TrainOptions(DeviceOptions):
    model: str | None = option(None, "timm model", shown="resnet18 on CPU, resnet152 on a GPU")
    image_size: int | None = option(None, "input resolution", shown="64 on CPU, 224 on a GPU", type=positive)
    batch_size: int = option(64, "rows per step", type=positive)
    labeled_per_batch: int | None = option(None, "labeled rows per batch", shown="a quarter", type=positive)
    steps: int = option(6, "timed steps of each kind per repeat", type=positive)
    precision: str = option("auto", "auto: fp32 on CPU, bf16 + channels-last on a GPU",
                            choices=("auto", "fp32", "bf16"))  # fmt: skip
    max_batch: bool = option(False, "also time the steps at the largest batch that fits the device",
                             action="store_true")  # fmt: skip
    compile: bool = option(False, "torch.compile the models (model.compile=true)", action="store_true")
    cuda_graph: bool | None = option(None, "the step captured as CUDA graphs (model.cuda_graph), or eager",
                                     shown="graphed and eager side by side on a GPU",
                                     action=argparse.BooleanOptionalAction)  # fmt: skip
    end_to_end: bool = option(False, "also time the real training loop against the bare step on the same batches",
                              in_all=True, action=argparse.BooleanOptionalAction)  # fmt: skip
    e2e_preset: str = option("digits-demo", "--end-to-end: the preset the loop trains")
    e2e_model: str | None = option(None, "--end-to-end: timm model instead of the preset's (e.g. resnet18)",
                                   shown="the preset's")  # fmt: skip
    e2e_shards: Path | None = option(None, "--end-to-end: a packed shard set to train on", type=Path,
                                     shown="the digits, packed as `mt-shard pack digits` does")  # fmt: skip
    e2e_epochs: int = option(2, "--end-to-end: epochs the loop trains", type=positive)
    e2e_backend: str | None = option(None, "--end-to-end: data.backend", choices=("torch", "dali"),
                                     shown="dali on a GPU, the preset's on CPU")  # fmt: skip


def bench_accelerator(device: Device) -> Accelerator:
    """A fresh single-process Accelerator on `device` with the bench's precision (bf16 or none)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # The bench runs in one process; an earlier Accelerator (another device or precision) is replaced.
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(
        cpu=device.name == "cpu",
        mixed_precision="bf16" if device.precision == "bf16" else "no",
        step_scheduler_with_optimizer=False,  # as mt-train: the step function steps the schedule
    )


def model_overrides(device: Device, compile: bool = False, cuda_graph: bool | None = None) -> list[str]:
    """The `--set` overrides of the model fields the bench's flags choose (memory format, compile, graph;
    `cuda_graph` None: the preset's)."""
    overrides = [f"model.channels_last={str(device.channels_last).lower()}", f"model.compile={str(compile).lower()}"]
    if cuda_graph is not None:
        overrides.append(f"model.cuda_graph={str(cuda_graph).lower()}")
    return overrides


def graph_modes(device: Device, cuda_graph: bool | None) -> list[tuple[bool | None, str]]:
    """(model.cuda_graph, figure suffix) of each way to time the step: on a GPU without a choice, both."""
    if device.name == "cuda" and cuda_graph is None:
        return [(True, ""), (False, "/eager")]
    return [(cuda_graph, "")]


def preset_config(model_name: str, device: Device, batch_size: int, labeled: int, overrides: list[str]) -> Config:
    """The ImageNet preset's Mean Teacher recipe with the benchmark's model, batch, device and flags."""
    from mt_scale.config import load_config

    return load_config(
        preset="imagenet-10pct-resnet152",
        overrides=[f"model.name={model_name}", *overrides, f"data.batch_size={batch_size}",
                   f"data.labeled_per_batch={labeled}", "run.batch_scope=per_device"],  # fmt: skip
    )


def prepare_steps(
    cfg: Config, accelerator: Accelerator, num_classes: int = NUM_CLASSES, steps_per_epoch: int = 1000
) -> dict[str, MeanTeacherStep]:
    """The three steps of KINDS over one student, teacher and optimizer, built as mt-train builds them."""
    from mt_scale.step import MeanTeacherStep, create_training

    parts = create_training(cfg, accelerator, num_classes, steps_per_epoch)
    baseline = dataclasses.replace(cfg, mt=dataclasses.replace(cfg.mt, enabled=False))
    return {
        "supervised": MeanTeacherStep.create(cfg, accelerator, *parts, use_teacher=False),
        "mean_teacher": MeanTeacherStep.create(cfg, accelerator, *parts),
        "supervised_baseline": MeanTeacherStep.create(baseline, accelerator, *parts),
    }


class StepBench:
    """The steps of `prepare_steps` and one synthetic batch (uint8 views, L labeled rows) on the device."""

    def __init__(self, cfg: Config, device: Device, image_size: int) -> None:
        import torch

        self.cfg = cfg
        self.steps = prepare_steps(cfg, bench_accelerator(device))
        batch, labeled = cfg.data.batch_size, cfg.data.labeled_per_batch
        shape = (batch, 3, image_size, image_size)
        generator = torch.Generator().manual_seed(0)
        student = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        teacher = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
        labels = torch.where(torch.arange(batch) < labeled, labels, -1)
        self.batch = {key: value.to(device.name) for key, value in
                      {"student": student, "teacher": teacher, "label": labels}.items()}  # fmt: skip
        self.step_count = 0

    def run(self, kind: str) -> None:
        """One step of `kind` (past the consistency ramp-up)."""
        self.step_count = self.steps[kind](self.batch, self.step_count).step


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is running out of memory: as torch raises it, or as mt_scale.step words it."""
    from mt_scale.step import memory_error

    if isinstance(exc, MtScaleError):
        return str(exc).startswith("out of memory")
    return isinstance(exc, RuntimeError) and memory_error(exc, 0) is not exc


def largest_batch(fits: Callable[[int], bool], start: int, cap: int = MAX_BATCH_CAP) -> tuple[int, str]:
    """The largest batch for which `fits` is true: double from `start` until it fails (or passes `cap`),
    then bisect between the last fit and the first failure to within 1/8 (multiples of 8)."""
    if not fits(start):
        raise MtScaleError(f"--max-batch: {start} rows do not fit in this device's memory; lower --batch-size")
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


def _fits(model_name: str, device: Device, image_size: int, overrides: list[str], batch: int) -> bool:
    """Whether two Mean Teacher steps at `batch` rows (a quarter labeled) run without running out of memory."""
    import gc

    import torch

    try:
        cfg = preset_config(model_name, device, batch, max(1, batch // 4), overrides)
        bench = StepBench(cfg, device, image_size)
        bench.run("mean_teacher")
        bench.run("mean_teacher")
        device.sync()
        return True
    except Exception as exc:  # noqa: BLE001 - only running out of memory is an answer; the rest is raised
        if not is_out_of_memory(exc):
            raise
        return False
    finally:
        gc.collect()
        if device.name == "cuda":
            torch.cuda.empty_cache()


def _peak_memory_gib(device: Device) -> Callable[[], float | None]:
    """A reading of the device memory allocated at most since now (GiB; None on a CPU)."""
    import torch

    if device.name != "cuda":
        return lambda: None
    torch.cuda.reset_peak_memory_stats()
    return lambda: round(torch.cuda.max_memory_allocated() / 2**30, 2)


def time_steps(options: TrainOptions, target: Device, model_name: str, image_size: int, batch_size: int,
               overrides: list[str], suffix: str = "") -> list[dict]:  # fmt: skip
    """Images/s of each kind at `batch_size` rows and `train/step_ratio{suffix}`, the kinds alternating."""
    labeled = options.labeled_per_batch or max(1, batch_size // 4)
    if not 1 <= labeled <= batch_size:
        raise MtScaleError(f"--labeled-per-batch {labeled}: must be in 1..--batch-size ({batch_size})")
    bench = StepBench(preset_config(model_name, target, batch_size, labeled, overrides), target, image_size)
    memory = _peak_memory_gib(target)
    steps = options.steps
    calls = [functools.partial(bench.run, kind) for kind in KINDS]
    alternate(calls, 3 if target.name == "cuda" else 1, target.sync)  # first steps allocate and pick kernels
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    ratios = []
    for _ in tqdm(range(options.repeats), desc=f"train{suffix}", unit="repeat"):
        seconds = dict(zip(KINDS, alternate(calls, steps, target.sync), strict=True))
        for kind in KINDS:
            rates[kind].append(bench.steps[kind].student_rows * steps / seconds[kind])
        ratios.append(seconds["mean_teacher"] / seconds["supervised"])
    detail = {
        "model": model_name, "image_size": image_size, "batch_size": batch_size, "labeled_per_batch": labeled,
        "steps": steps, "device": target.name, "precision": target.precision,
        "channels_last": target.channels_last, "compile": options.compile,
        "cuda_graph": bench.cfg.model.cuda_graph, "step_mode": bench.steps["mean_teacher"].mode,
        "two_heads": bench.cfg.model.two_heads, "consistency": bench.cfg.mt.consistency,
        "step": "mt_scale.step.MeanTeacherStep", "peak_memory_gib": memory(),
    }  # fmt: skip
    modes = {"supervised": "use_teacher=False", "mean_teacher": "mt.enabled=true",
             "supervised_baseline": "mt.enabled=false (mt-train's baseline: labeled rows only)"}  # fmt: skip
    figures = [figure(f"train/{kind}{suffix}", "img/s", rates[kind], **detail, mode=modes[kind],
                      student_rows=bench.steps[kind].student_rows) for kind in KINDS]  # fmt: skip
    return [*figures, figure(f"train/step_ratio{suffix}", "x", ratios, **detail)]


def graph_speedup(figures: list[dict], suffix: str = "") -> list[dict]:
    """`train/graph_speedup{suffix}`: the graphed Mean Teacher step's rate over the eager one's, per repeat."""
    by_name = {f["name"]: f for f in figures}
    graphed, eager = by_name.get(f"train/mean_teacher{suffix}"), by_name.get(f"train/mean_teacher{suffix}/eager")
    if graphed is None or eager is None:
        return []
    ratios = [g / e for g, e in zip(graphed["values"], eager["values"], strict=True)]
    detail = {key: graphed["detail"][key] for key in ("model", "image_size", "batch_size", "device", "precision")}
    return [figure(f"train/graph_speedup{suffix}", "x", ratios, **detail, graphed=graphed["detail"]["step_mode"])]


def run(options: TrainOptions, work_dir: Path) -> list[dict]:
    """The step figures at --batch-size (and at the largest batch with --max-batch), graphed and eager on
    a GPU unless --cuda-graph/--no-cuda-graph chooses; --end-to-end's too."""
    target = resolve_device(options.device, options.precision)
    on_gpu = target.name == "cuda"
    if options.max_batch and not on_gpu:
        raise MtScaleError("--max-batch searches a GPU's memory; use it with --device cuda")
    model_name = options.model or ("resnet152" if on_gpu else "resnet18")
    image_size = options.image_size or (224 if on_gpu else 64)
    modes = graph_modes(target, options.cuda_graph)
    figures: list[dict] = []
    for graphed, mode in modes:
        overrides = model_overrides(target, options.compile, graphed)
        figures += time_steps(options, target, model_name, image_size, options.batch_size, overrides, mode)
    figures += graph_speedup(figures)
    if options.max_batch:
        fits = functools.partial(_fits, model_name, target, image_size, model_overrides(target, options.compile))
        largest, why = largest_batch(fits, options.batch_size)
        figures.append(figure("train/max_batch", "rows", [largest], model=model_name, image_size=image_size,
                              device=target.name, precision=target.precision, search=why))  # fmt: skip
        if largest != options.batch_size:
            for graphed, mode in modes:
                overrides = model_overrides(target, options.compile, graphed)
                figures += time_steps(options, target, model_name, image_size, largest, overrides,
                                      f"/max_batch{mode}")  # fmt: skip
            figures += graph_speedup(figures, "/max_batch")
    if options.end_to_end:
        from mt_scale.bench.end_to_end import EndToEnd, time_end_to_end

        for graphed, mode in modes:
            setup = EndToEnd(options.e2e_preset, options.e2e_model, options.e2e_shards, options.e2e_epochs,
                             options.e2e_backend, model_overrides(target, options.compile, graphed))  # fmt: skip
            figures += time_end_to_end(setup, target, options.repeats, work_dir, mode)
    return figures
