"""Shared pieces of mt-bench: stage options, figures (median/min/max over repeats), timing, the machine."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from mt_scale.errors import MtScaleError

NUM_CLASSES = 1000  # ImageNet's head: the classifier size the ImageNet preset trains

# Distributions whose versions decide the numbers; recorded with every result file.
LIBRARIES = (
    "mt-scale",
    "torch",
    "torchvision",
    "timm",
    "webdataset",
    "nvidia-dali-cuda120",
    "nvidia-dali-cuda130",
    "opencv-python-headless",
    "pillow",
    "numpy",
    "accelerate",
)


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    from shard_tools.pack import default_workers

    return default_workers()


def figure(name: str, unit: str, values: list[float], **detail: object) -> dict:
    """One measured figure: the statistics over its repeats, the raw values, and what was measured."""
    if not values:
        raise ValueError(f"figure {name}: no values measured")
    return {
        "name": name,
        "unit": unit,
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
        "repeats": len(values),
        "values": [float(value) for value in values],
        "detail": detail,
    }


class Stopwatch:
    """`with Stopwatch() as watch: ...` then `watch.seconds`; `sync` runs before each reading (CUDA)."""

    def __init__(self, sync=None) -> None:
        self.sync = sync
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        if self.sync:
            self.sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sync:
            self.sync()
        self.seconds = time.perf_counter() - self._start


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def describe_machine() -> dict:
    """What ran the benchmark: CPU, cores, memory, GPUs (name, memory, CUDA), the load when it started."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    gpu_memory = [round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1) for i in range(len(gpus))]
    try:
        load = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_gib": _memory_gib(),
        "gpus": gpus,
        "gpu_memory_gib": gpu_memory,
        "cuda": torch.version.cuda if gpus else None,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load,
    }


def library_versions() -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_load(stage: str) -> float:
    """The 1-minute load average now, with a loud stderr warning when over half the usable cores are busy."""
    load, cores = os.getloadavg()[0], usable_cores()
    if load > cores / 2:
        print(
            f"mt-bench {stage}: WARNING: the 1-minute load average is {load:.2f} on {cores} cores: this machine "
            "is busy, so the figures will be low and noisy; rerun on a quiet machine",
            file=sys.stderr,
        )
    return load


def alternate(
    calls: Sequence[Callable[[], object]], count: int, sync: Callable[[], None] | None = None
) -> list[float]:
    """Seconds spent in `count` calls of each, called in turns so a change in machine load hits all alike."""
    totals = [0.0] * len(calls)
    for _ in range(count):
        for index, call in enumerate(calls):
            with Stopwatch(sync) as watch:
                call()
            totals[index] += watch.seconds
    return totals


@dataclass
class Device:
    """Where the train and ema stages run: "cpu" or "cuda", "fp32" or "bf16", and the memory format."""

    name: str
    precision: str
    channels_last: bool

    def sync(self) -> None:
        if self.name == "cuda":
            import torch

            torch.cuda.synchronize()


def resolve_device(device: str, precision: str = "auto") -> Device:
    """`auto` picks the GPU when there is one; bf16 + channels-last is the GPU default."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MtScaleError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or auto")
    on_gpu = device == "cuda"
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    return Device(device, precision, channels_last=on_gpu)


# --------------------------------------------------------------------------- options


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def image_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT, e.g. 500x375") from None
    if width < 8 or height < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: images need at least 8x8 pixels")
    return width, height


def option(
    default: Any,
    help: str,
    *,
    shared: bool = False,
    shown: str | None = None,
    in_all: Any = None,
    **argparse_kwargs: Any,
) -> Any:
    """A stage option: a dataclass field whose default and help the mt-bench parser reads.

    `shared` options (the same in several stages) appear once in `mt-bench all`; the others appear
    there prefixed with their stage (`--train-batch-size`). `in_all`, when given, is the default in
    `mt-bench all` instead. `shown` describes the default in the help (when it is None or computed);
    other keywords go to `add_argument`.
    """
    if shown is None:
        shown = "x".join(map(str, default)) if isinstance(default, tuple) else str(default)
    if in_all is not None:
        shown += f"; {in_all} in mt-bench all"
    metadata = {"help": f"{help} (default: {shown})", "shared": shared, "argparse": argparse_kwargs,
                "in_all": default if in_all is None else in_all}  # fmt: skip
    return field(default=default, metadata=metadata)


@dataclass
class StageOptions:
    repeats: int = option(3, "timed repeats per figure", shared=True, type=positive)


@dataclass
class DeviceOptions(StageOptions):
    device: str = option("auto", "train/ema device", shared=True, choices=("auto", "cpu", "cuda"))
