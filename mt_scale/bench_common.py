"""Shared pieces of mt-bench: figures (median/min/max over repeats), the machine and library record."""

from __future__ import annotations

import os
import platform
import statistics
import time
from importlib import metadata

# Distributions whose versions decide the numbers; recorded with every result file.
LIBRARIES = (
    "mt-scale",
    "torch",
    "torchvision",
    "timm",
    "webdataset",
    "nvidia-dali-cuda120",
    "opencv-python-headless",
    "pillow",
    "numpy",
    "accelerate",
)


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
    """What ran the benchmark: CPU, cores, memory, GPU, and the load when it started (shared machines)."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
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
