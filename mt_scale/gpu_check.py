"""`mt-bench gpu`: one command that proves the GPU path and measures it (issue 14).

Checks DALI's GPU pipelines (structure, eval view against the torch backend, training-view
statistics against the augmentation spec), measures the two-view DALI loader, the shipped step
(mt_scale.step) on timm resnet152 in bf16 channels-last at the preset's per-device batch and at the
largest batch that fits, with and without torch.compile, and the EMA update, then runs a 30-step
mt-train with a checkpoint and an exact resume. Writes a JSON of figures and a Markdown table.
`--dry-run` runs the same code on the CPU with tiny sizes (CI); `--wheels DIR` first joins split
wheels and installs what this Python lacks from DIR, never from the network. Self-contained on
purpose (one file that a bare GPU machine runs); docs/performance.md, "GPU check", explains it all.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib
import io
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from mt_scale.errors import MtScaleError

PRESET = "imagenet-10pct-resnet152"  # the recipe the figures are about
NUM_CLASSES = 1000
GOAL_MT_IMG_S = 1400.0  # issue 14, one H100, end to end with the DALI loader
GOAL_LOADER_X = 2.0  # loader at least 2x the step's demand
GOAL_EMA_X = 10.0  # fused EMA at least 10x the per-tensor loop
RESULT_KEYS = (
    "gpu/loader_img_s", "gpu/loader_keeps_up",
    "gpu/mt_step_img_s", "gpu/supervised_step_img_s",
    "gpu/mt_step_img_s/compile", "gpu/supervised_step_img_s/compile",
    "gpu/max_batch", "gpu/mt_step_img_s/max_batch", "gpu/supervised_step_img_s/max_batch",
    "gpu/mt_step_img_s/max_batch_compile", "gpu/supervised_step_img_s/max_batch_compile",
    "gpu/peak_mem_gib", "gpu/compile_s",
    "gpu/mt_end_to_end_img_s", "gpu/mt_end_to_end_img_s/global_batch", "gpu/mt_end_to_end_img_s/max_batch",
    "gpu/ema_fused_ms", "gpu/ema_loop_ms", "gpu/ema_speedup",
)  # fmt: skip
CHECK_NAMES = (
    "dali/structure",
    "dali/eval_matches_torch",
    "dali/geometry",
    "dali/colour",
    "train/mt_train_30_steps",
    "train/resume_exact",
)
# What the kit imports beyond the standard library: import name -> the distribution to bring as a wheel.
REQUIRED_MODULES = {
    "torch": "torch", "timm": "timm", "accelerate": "accelerate", "numpy": "numpy",
    "cv2": "opencv-python-headless", "PIL": "pillow", "yaml": "pyyaml", "tqdm": "tqdm",
    "safetensors": "safetensors", "sklearn": "scikit-learn",
    "matplotlib": "matplotlib", "tensorboard": "tensorboard", "webdataset": "webdataset",
    "nvidia.dali": "nvidia-dali-cuda130 (CUDA 13 torch) or nvidia-dali-cuda120 (CUDA 12 torch)",
}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Sizes of one run. GPU_PLAN fits 8 minutes on one H100; DRY_PLAN is the same code, tiny, on CPU."""

    dry_run: bool
    budget_s: float  # optional parts (torch.compile) are skipped when they would overrun it
    model: str = "resnet152"
    ema_model: str = "resnet152"
    precision: str = "bf16"  # Accelerate's mixed_precision
    compile_backend: str = "inductor"  # torch.compile's default; the dry run traces with "eager"
    view_size: int = 224  # synthetic step inputs
    batch: int = 40  # the preset's per-device batch (the reference's base_batch_size) ...
    labeled: int = 20  # ... and labeled rows
    global_batch: int = 400  # the preset's whole batch (half labeled), on one device
    warmup_steps: int = 5
    timed_steps: int = 20
    max_batch_cap: int = 2048
    photos: int = 1024  # ImageNet-size JPEGs for the loader
    photo_size: tuple[int, int] = (500, 375)
    val_photos: int = 32
    loader_workers: int = 8  # DALI threads per pipeline (the preset's data.workers)
    loader_warmup: int = 10
    loader_batches: int = 100
    stat_views: int = 512  # views per statistics check
    stat_batch: int = 64
    ema_blocks: int = 5
    ema_updates: int = 10  # per block
    e2e_warmup: int = 10
    e2e_steps: int = 60
    train_model: str = "resnet152"
    train_photo_size: tuple[int, int] = (320, 240)
    train_classes: int = 10
    train_labels_per_class: int = 10  # 100 labeled, 200 unlabeled: 10 steps of 20 unlabeled rows per epoch
    train_photos: int = 300
    train_val: int = 40

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"


GPU_PLAN = Plan(dry_run=False, budget_s=420.0)  # + imports and install: under 8 minutes
DRY_PLAN = Plan(
    dry_run=True, budget_s=600.0, model="test_resnet", ema_model="test_resnet", precision="no",
    compile_backend="eager", view_size=64, batch=4, labeled=2, global_batch=8, warmup_steps=1, timed_steps=3,
    max_batch_cap=16,
    photos=24, photo_size=(64, 64), val_photos=8, loader_workers=1, loader_warmup=1, loader_batches=4,
    stat_views=64, stat_batch=32, ema_blocks=2, ema_updates=3, e2e_warmup=1, e2e_steps=3,
    train_model="test_resnet",
    train_photo_size=(64, 64), train_classes=2, train_labels_per_class=5, train_photos=30, train_val=8,
)  # fmt: skip


# ------------------------------------------------------------------ the report


@dataclass
class Report:
    """Results, checks and timings of one run; saved (JSON + Markdown, atomically) after every part."""

    plan: Plan
    json_path: Path | None = None
    markdown_path: Path | None = None
    machine: dict = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)
    checks: dict[str, dict] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def result(
        self,
        key: str,
        value: float | None,
        unit: str,
        *,
        goal: str = "",
        meets: bool | None = None,
        **detail: Any,
    ) -> None:
        verdict = "" if meets is None else ("meets goal" if meets else "misses goal")
        if meets is not None and self.plan.dry_run:
            verdict = "n/a (dry run)"
        self.results[key] = {"value": value, "unit": unit, "goal": goal, "verdict": verdict, "detail": detail}

    def skip(self, key: str, reason: str, unit: str = "") -> None:
        self.results[key] = {
            "value": None,
            "unit": unit,
            "goal": "",
            "verdict": f"skipped: {reason}",
            "detail": {},
        }

    def check(self, name: str, passed: bool, **detail: Any) -> bool:
        self.checks[name] = {"passed": bool(passed), "detail": detail}
        return bool(passed)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.plan.budget_s - self.elapsed()

    def as_dict(self) -> dict:
        results = {
            key: self.results.get(
                key, {"value": None, "unit": "", "goal": "", "verdict": "not run", "detail": {}}
            )
            for key in RESULT_KEYS
        }
        results.update({k: v for k, v in self.results.items() if k not in results})
        return {
            "kit": "mt-bench gpu", "dry_run": self.plan.dry_run, "machine": self.machine,
            "plan": asdict(self.plan), "results": results, "checks": self.checks,
            "timings_s": {k: round(v, 2) for k, v in self.timings_s.items()},
            "total_s": round(self.elapsed(), 1), "budget_s": self.plan.budget_s,
            "all_checks_passed": bool(self.checks) and all(c["passed"] for c in self.checks.values()),
        }  # fmt: skip

    def save(self) -> None:
        from shard_tools.files import atomic_write

        data = self.as_dict()
        if self.json_path is not None:
            atomic_write(self.json_path, json.dumps(data, indent=2, default=str) + "\n")
        if self.markdown_path is not None:
            atomic_write(self.markdown_path, markdown(data))


def _format(value: Any) -> str:
    if isinstance(value, str):
        return " ".join(value.split()).replace("|", "/")
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown(data: dict) -> str:
    """The run as Markdown: what ran where, the figures beside their goals, the checks."""
    machine = data["machine"]
    title = (
        "dry run on the CPU (tiny sizes: the figures mean nothing)"
        if data["dry_run"]
        else machine.get("card")
    )
    lines = [
        f"### mt-bench gpu: {title}", "",
        f"torch {machine.get('torch')} (CUDA {machine.get('cuda')}), DALI {machine.get('dali')}, timm "
        f"{machine.get('timm')}, Accelerate {machine.get('accelerate')}, Python {machine.get('python')}; "
        f"1-minute load {machine.get('load_1min_start')} at start, {machine.get('load_1min_end')} at end; "
        f"{data['total_s']:.0f} s (budget {data['budget_s']:.0f} s).", "",
        "| result | value | unit | goal | verdict |", "|---|---:|---|---|---|",
    ]  # fmt: skip
    for key, entry in data["results"].items():
        lines.append(
            f"| `{key}` | {_format(entry['value'])} | {entry['unit']} | {entry['goal']} "
            f"| {entry['verdict']} |"
        )
    lines += ["", "| check | passed | detail |", "|---|---|---|"]
    for name, entry in data["checks"].items():
        detail = "; ".join(
            f"{k}={_format(v)}"
            for k, v in entry["detail"].items()
            if k != "traceback" and not isinstance(v, dict) and (v or v == 0)
        )
        lines.append(f"| `{name}` | {'yes' if entry['passed'] else '**no**'} | {detail} |")
    return "\n".join(lines) + "\n"


def describe_machine(plan: Plan) -> dict:
    """The card, the library versions and the load: what decides the figures."""
    import torch

    versions = {}
    for key, dist in (
        ("dali", "nvidia-dali-cuda130"),
        ("dali", "nvidia-dali-cuda120"),
        ("timm", "timm"),
        ("accelerate", "accelerate"),
        ("webdataset", "webdataset"),
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.setdefault(key, metadata.version(dist))
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not plan.dry_run else "cpu"
    memory = (
        round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        if torch.cuda.is_available() and not plan.dry_run
        else None
    )
    return {
        "card": card,
        "gpu_memory_gib": memory,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_1min_start": round(os.getloadavg()[0], 2),
        **versions,
    }


# ------------------------------------------------------------------ wheels (a bare GPU machine, no network)

_PART = re.compile(r"^(?P<wheel>.+\.whl)\.part-[A-Za-z0-9]+$")


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_dist(wheel: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel file name."""
    parts = wheel.name[: -len(".whl")].split("-")
    if len(parts) < 5:
        raise MtScaleError(
            f"{wheel}: not a wheel file name (name-version-python-abi-platform.whl); remove it"
        )
    return _dist_name(parts[0]), parts[1]


def _wheel_problem(path: Path, sha256_file: Path) -> str | None:
    if sha256_file.is_file():
        expected = sha256_file.read_text().split()[0].lower()
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            return f"do not match {sha256_file.name} (a part is missing, extra or damaged)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"do not make a valid wheel ({exc}: a part is missing or damaged)"
    return f"make a wheel whose member {bad} is damaged" if bad else None


def join_wheel_parts(folder: Path) -> list[Path]:
    """Join every `<wheel>.part-*` group under `folder` (`split -b 55m`) into `<wheel>` beside its parts,
    in suffix order; returns the wheels made.

    A wheel that is already there and valid is kept. The joined file must be a valid zip (every
    member's CRC checked) and match `<wheel>.sha256` when that file is present.
    """
    groups: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*.whl.part-*")):
        match = _PART.match(path.name)
        if match and path.is_file():
            groups.setdefault(path.parent / match["wheel"], []).append(path)
    made = []
    for wheel, parts in sorted(groups.items()):
        checksum = wheel.with_name(f"{wheel.name}.sha256")
        if wheel.is_file() and _wheel_problem(wheel, checksum) is None:
            continue
        temp = wheel.with_name(f".{wheel.name}.partial")
        with open(temp, "wb") as out:
            for part in parts:  # split's suffixes (aa, ab, ... or 00, 01, ...) sort in order
                with open(part, "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 24)
        problem = _wheel_problem(temp, checksum)
        if problem:
            temp.unlink()
            raise MtScaleError(
                f"{wheel.parent}: the {len(parts)} parts of {wheel.name} {problem}; bring all its parts "
                "again (docs/performance.md, GPU check)"
            )
        os.replace(temp, wheel)
        made.append(wheel)
    return made


def _installed(dist: str, target: Path | None) -> str | None:
    paths = [str(target)] if target is not None else None
    for found in metadata.distributions(**({"path": paths} if paths else {})):
        if _dist_name(found.metadata["Name"] or "") == dist:
            return found.version
    if target is not None:
        return _installed(dist, None)
    return None


def _requirements(wheel: Path) -> list[str]:
    """The distributions `wheel` requires here (extras and other platforms' markers left out)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return []
    with zipfile.ZipFile(wheel) as archive:
        name = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = archive.read(name).decode("utf-8", "replace") if name else ""
    needed = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                needed.append(_dist_name(requirement.name))
    return needed


def prepare_wheels(
    folder: Path, *, target: Path | None = None, dry_run: bool = False, log: Callable[[str], None] = print
) -> dict[str, list[str]]:
    """Join split wheels anywhere under `folder`, then pip-install (offline, --no-deps) every wheel under
    it whose distribution is not installed yet.

    `target`: install there (pip --target) instead of this environment; `dry_run`: pip --dry-run.
    Returns {"joined", "installed", "present", "unmet"}; "unmet" names requirements of the installed
    wheels that are neither installed nor among the wheels (bring those too).
    """
    summary: dict[str, list[str]] = {"joined": [], "installed": [], "present": [], "unmet": []}
    if not folder.is_dir():
        log(f"mt-bench gpu: no wheel folder {folder}: nothing to install")
        return summary
    summary["joined"] = [p.name for p in join_wheel_parts(folder)]
    wheels: dict[str, Path] = {}
    for wheel in sorted(folder.rglob("*.whl")):
        dist, _ = _wheel_dist(wheel)
        if dist in wheels:
            raise MtScaleError(
                f"{folder}: two wheels of {dist} ({wheels[dist].name}, {wheel.name}); keep one"
            )
        wheels[dist] = wheel
    missing = {dist: wheel for dist, wheel in wheels.items() if _installed(dist, target) is None}
    summary["present"] = sorted(set(wheels) - set(missing))
    if missing:
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "-q",
            "--find-links",
            str(folder),
        ]
        command += ["--target", str(target)] if target is not None else []
        command += ["--dry-run"] if dry_run else []
        done = subprocess.run([*command, *map(str, missing.values())], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise MtScaleError(
                f"{folder}: pip could not install {', '.join(sorted(missing))} offline: {last}"
            )
        summary["installed"] = sorted(missing)
    for dist, wheel in sorted(missing.items()):
        for needed in _requirements(wheel):
            if needed not in wheels and _installed(needed, target) is None:
                summary["unmet"].append(f"{dist} needs {needed}")
    log(
        f"mt-bench gpu: wheels in {folder}: joined {summary['joined'] or 'none'}, installed "
        f"{summary['installed'] or 'none'}, already present {summary['present'] or 'none'}"
    )
    for line in summary["unmet"]:
        log(f"mt-bench gpu: WARNING: {line}, which is neither installed nor in {folder}: bring its wheel")
    if target is not None and not dry_run and str(target) not in sys.path:
        sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return summary


def missing_modules() -> list[str]:
    """What the kit imports that this Python lacks, as 'module (wheel to bring)'."""
    absent = []
    for module, dist in REQUIRED_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            absent.append(f"{module} ({dist})")
    return absent


# ------------------------------------------------------------------ small helpers


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        with contextlib.suppress(ImportError, AttributeError, RuntimeError):
            from nvidia.dali.backend import ReleaseUnusedMemory

            ReleaseUnusedMemory()


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


def ks_two_sample(a: Any, b: Any) -> float:
    """Kolmogorov-Smirnov distance between two samples' empirical distributions."""
    import numpy as np

    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.concatenate([a, b])
    return float(
        np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
    )


def ks_uniform(values: Any, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance of a sample from the uniform distribution on [low, high]."""
    import numpy as np

    x = np.sort(np.asarray(values, dtype=float))
    cdf = np.clip((x - low) / (high - low), 0.0, 1.0)
    ranks = np.arange(1, len(x) + 1) / len(x)
    return float(max((ranks - cdf).max(), (cdf - ranks + 1 / len(x)).max()))


def ks_limit(n: int, m: int | None = None) -> float:
    """The KS distance a sample of n (against m, or an exact law) exceeds by chance with p ~ 0.001."""
    return 1.95 * math.sqrt(1 / n + (1 / m if m else 0.0))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}" if text else type(exc).__name__


def _forever(loader: Any) -> Iterator[dict]:
    while True:
        yield from loader


# ------------------------------------------------------------------ generated data

GEOMETRY_SIZE = (512, 384)  # (width, height) of the coordinate pattern; not square, so a swapped axis shows
COLOUR_VIEW = (96, 288)  # the colour pattern's 3 x 9 patches, 32 output pixels each
COLOUR_LEVELS = (70, 110, 150)  # 27 mid-range colours: most stay unclamped under +-40% jitter
YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))  # luma + chroma (IQ) axes


@dataclass
class Data:
    photo_shards: Path
    geometry_shards: list[str]
    colour_shards: list[str]
    photos: Path | None = None  # the JPEG tree behind photo_shards


def coordinate_pattern(width: int, height: int) -> Any:
    """HWC uint8 image whose red channel encodes x and green encodes y (0..255 across), blue 128."""
    import numpy as np

    image = np.full((height, width, 3), 128, dtype=np.uint8)
    image[..., 0] = np.rint((np.arange(width) + 0.5) / width * 255)[None, :]
    image[..., 1] = np.rint((np.arange(height) + 0.5) / height * 255)[:, None]
    return image


def colour_pattern(cell: int = 64) -> Any:
    """HWC uint8 image of 3 x 9 flat patches, one per colour of COLOUR_LEVELS^3."""
    import numpy as np

    image = np.zeros((3 * cell, 9 * cell, 3), dtype=np.uint8)
    colours = [(r, g, b) for r in COLOUR_LEVELS for g in COLOUR_LEVELS for b in COLOUR_LEVELS]
    for index, colour in enumerate(colours):
        row, col = divmod(index, 9)
        image[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = colour
    return image


def _pattern_shards(root: Path, image: Any, quality: int) -> list[str]:
    """Pack 8 copies of `image` (two classes) and return the labeled split's shard paths."""
    from PIL import Image

    from pipelines.reading import open_set
    from shard_tools.pack import pack

    for label in range(2):
        folder = root / "tree" / "train" / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for copy in range(4):
            Image.fromarray(image).save(folder / f"p{label}_{copy}.JPEG", quality=quality, subsampling=0)
    pack(root / "tree", root / "shards", label_fraction=0.5, val_fraction=0.0, workers=1, progress=False)
    return list(open_set(str(root / "shards"))[1]["train-labeled"].shards)


def photo_tree(dest: Path, count: int, val_count: int, size: tuple[int, int], workers: int) -> Path:
    """shard_tools.samples' generated photos (10 classes), written by `workers` processes into one tree."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from shard_tools.samples import write_photo_tree

    kwargs = {"num_classes": 10, "size": size, "with_val": True}
    if workers <= 1:
        return write_photo_tree(dest, count=count, seed=0, val_count=val_count, **kwargs)

    def share(total: int, k: int) -> int:
        return total * (k + 1) // workers - total * k // workers

    shares = [(dest / f"part-{k}", share(count, k), share(val_count, k)) for k in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:  # no CUDA state forked
        futures = [pool.submit(write_photo_tree, part, count=n, seed=k, val_count=v, **kwargs)
                   for k, (part, n, v) in enumerate(shares)]  # fmt: skip
        for future in futures:
            future.result()
    for k, (part, _, _) in enumerate(shares):  # one tree, file names made unique per part
        for image in sorted(part.rglob("*.JPEG")):
            target = dest / image.relative_to(part).parent / f"p{k}_{image.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.replace(target)
        shutil.rmtree(part)
    return dest


def part_data(ctx: Context) -> None:
    """ImageNet-size photos packed with the packer's defaults, and the two test patterns' shards."""
    from shard_tools.pack import pack

    plan, work = ctx.plan, ctx.work
    workers = min(8, os.cpu_count() or 1) if plan.photos >= 256 else 1
    tree = photo_tree(work / "photos", plan.photos, plan.val_photos, plan.photo_size, workers)
    pack(tree, work / "photo-shards", label_fraction=0.5, seed=0, progress=False)
    ctx.data = Data(
        work / "photo-shards",
        _pattern_shards(work / "geometry", coordinate_pattern(*GEOMETRY_SIZE), 95),
        _pattern_shards(work / "colour", colour_pattern(), 100),
        tree,
    )


def repeated_photo_shards(ctx: Context, unlabeled_rows: int) -> Path:
    """The photo shards, or for a batch their unlabeled split cannot fill four times over, a bigger set:
    the same JPEGs hard-linked under several names (decoding costs the same) and packed with the defaults."""
    from shard_tools.format import TRAIN_UNLABELED
    from shard_tools.manifest import read_manifest
    from shard_tools.pack import pack

    data = ctx.need_data()
    have = read_manifest(data.photo_shards).split(TRAIN_UNLABELED).num_samples
    copies = -(-4 * unlabeled_rows // max(have, 1))
    if copies <= 1 or data.photos is None:
        return data.photo_shards
    tree, dest = data.photos, ctx.work / f"photos-x{copies}"
    if not dest.exists():
        for image in sorted(tree.rglob("*.JPEG")):
            relative = image.relative_to(tree)
            for copy in range(copies if relative.parts[0] == "train" else 1):
                target = dest / relative.parent / f"r{copy}_{image.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(image, target)
        pack(dest, ctx.work / f"photo-shards-x{copies}", label_fraction=0.5, seed=0, progress=False)
    return ctx.work / f"photo-shards-x{copies}"


# ------------------------------------------------------------------ DALI: structure, eval view, statistics


def _data_config(plan: Plan, **overrides: Any) -> Any:
    from pipelines import DataConfig

    values = dict(
        batch_size=plan.batch,
        labeled_per_batch=plan.labeled,
        student_aug="imagenet-train",
        teacher_aug="imagenet-train",
        eval_aug="imagenet-eval",
        workers=plan.loader_workers,
        shuffle_buffer=1000,
        eval_batch_size=plan.val_photos,
        seed=0,
    )
    return DataConfig(**{**values, **overrides})


def check_structure(ctx: Context) -> bool:
    """Both views, labels (-1 = unlabeled mask), the val batch's valid mask: shapes, dtypes, devices."""
    import torch

    from pipelines import build_loaders

    plan, problems = ctx.plan, []
    loaders = build_loaders(ctx.need_data().photo_shards, _data_config(plan), backend="dali")
    batch, val = next(iter(loaders.train)), next(iter(loaders.val))
    rows, labeled, size = plan.batch, plan.labeled, (224, 224)

    def expect(condition: bool, text: str) -> None:
        if not condition:
            problems.append(text)

    for view in ("student", "teacher"):
        tensor = batch[view]
        expect(tuple(tensor.shape) == (rows, 3, *size), f"{view} shape {tuple(tensor.shape)}")
        expect(
            tensor.dtype == torch.uint8 and tensor.device.type == plan.device,
            f"{view} {tensor.dtype} on {tensor.device}",
        )
    label = batch["label"]
    expect(
        label.dtype == torch.int64 and tuple(label.shape) == (rows,),
        f"label {label.dtype} {tuple(label.shape)}",
    )
    expect(
        bool(((label[:labeled] >= 0) & (label[:labeled] < loaders.num_classes)).all()), "labeled rows' labels"
    )
    expect(bool((label[labeled:] == -1).all()), "unlabeled rows are not all -1")
    differing = sum(not torch.equal(s, t) for s, t in zip(batch["student"], batch["teacher"], strict=True))
    expect(differing >= 0.9 * rows, f"only {differing} of {rows} view pairs differ")
    image, valid = val["image"], val["valid"]
    expect(
        tuple(image.shape) == (plan.val_photos, 3, *size)
        and image.dtype == torch.uint8
        and image.device.type == plan.device,
        f"val image {tuple(image.shape)} {image.dtype} on {image.device}",
    )
    expect(valid.dtype == torch.bool and int(valid.sum()) == plan.val_photos, f"val valid mask {valid.dtype}")
    expect(val["label"].dtype == torch.int64, f"val label {val['label'].dtype}")
    return ctx.report.check(
        "dali/structure",
        not problems,
        problems=problems,
        views=f"{rows}x3x224x224 uint8 on {batch['student'].device}",
        label=f"int64 on {label.device}, {labeled} labeled then -1",
        val=f"{tuple(image.shape)} + valid mask",
    )


def check_eval_view(ctx: Context) -> bool:
    """The eval view (resize 256, centre crop 224) of DALI against the torch backend's, image by image."""
    from pipelines import build_loaders

    views = {}
    for backend, workers in (("dali", ctx.plan.loader_workers), ("torch", 0)):
        cfg = _data_config(ctx.plan, workers=workers)
        batch = next(
            iter(build_loaders(ctx.need_data().photo_shards, cfg, backend=backend, with_keys=True).val)
        )
        views[backend] = dict(zip(batch["key"], batch["image"].cpu()[batch["valid"].cpu()], strict=True))
    same_keys = views["dali"].keys() == views["torch"].keys()
    differences = [
        float((views["dali"][k].float() - image.float()).abs().mean())
        for k, image in views["torch"].items()
        if k in views["dali"]
    ]
    worst = max(differences) if differences else float("inf")
    return ctx.report.check(
        "dali/eval_matches_torch",
        same_keys and worst < 2.0,
        images=len(differences),
        worst_mean_abs_diff=round(worst, 3),
        limit="< 2 grey levels per image",
    )


def _to_numpy(output: Any) -> Any:
    from nvidia.dali.backend import TensorListGPU

    return (output.as_cpu() if isinstance(output, TensorListGPU) else output).as_array()


def pattern_views(ctx: Context, shards: list[str], specs: tuple, count: int) -> list[Any]:
    """`count` views per spec of the pattern in `shards`, from pipelines.dali's graph (GPU when present)."""
    import numpy as np
    import torch

    from pipelines.dali import build_pipeline

    device_id = torch.cuda.current_device() if ctx.plan.device == "cuda" else None
    pipe = build_pipeline(
        shards,
        specs,
        ctx.plan.stat_batch,
        shard_id=0,
        num_shards=1,
        shuffle_buffer=0,
        seed=7,
        threads=ctx.plan.loader_workers,
        device_id=device_id,
    )
    outputs: list[list] = [[] for _ in specs]
    while sum(len(o) for o in outputs[0]) < count:
        produced = pipe.run()
        for index in range(len(specs)):
            outputs[index].append(_to_numpy(produced[index]))
    del pipe
    return [np.concatenate(o)[:count] for o in outputs]


def view_geometry(view: Any, width: int, height: int) -> tuple[float, float, bool, float] | None:
    """(crop area / image area, crop aspect w/h, flipped, rotation degrees) of one CHW view of the
    coordinate pattern, from a least-squares affine fit of source coordinates over output pixels."""
    import numpy as np

    red, green, blue = (channel.astype(np.float64) for channel in view)
    inside = (
        (blue > 64) & (red > 2) & (red < 253) & (green > 2) & (green < 253)
    )  # not fill, not a clamped end
    if inside.mean() < 0.25:
        return None
    out_h, out_w = red.shape
    ys, xs = np.nonzero(inside)
    design = np.stack([xs, ys, np.ones(len(xs))], axis=1).astype(np.float64)
    fx = np.linalg.lstsq(design, red[inside] / 255 * width, rcond=None)[0]
    fy = np.linalg.lstsq(design, green[inside] / 255 * height, rcond=None)[0]
    determinant = fx[0] * fy[1] - fx[1] * fy[0]
    area = abs(determinant) * out_w * out_h / (width * height)
    aspect = math.hypot(fx[0], fy[0]) * out_w / (math.hypot(fx[1], fy[1]) * out_h)
    return float(area), float(aspect), bool(determinant < 0), math.degrees(math.atan2(-fx[1], fy[1]))


def _patch_means(view: Any) -> Any:
    import numpy as np

    cell = view.shape[1] // 3
    inner = slice(cell // 5, cell - cell // 5)
    return np.array(
        [
            view[:, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell][:, inner, inner]
            .reshape(3, -1)
            .mean(1)
            for r in range(3)
            for c in range(9)
        ]
    )


def view_colour(view: Any, plain: Any) -> tuple[float, float, float, float, float] | None:
    """(brightness, contrast, saturation, hue in turns, fit residual) of one jittered view of the colour
    pattern, given the same view without jitter: fit out = M rgb + t over the unclamped patches, then
    M = b*c * hue(h) saturation(s) (luma gain b*c; the chroma block in YIQ is s times a rotation by h)
    and t = b*(1-c) * the view's mean grey, as pipelines.augment composes them."""
    import numpy as np

    jittered, source = _patch_means(view.astype(np.float64)), _patch_means(plain.astype(np.float64))
    usable = (jittered.min(1) > 3) & (jittered.max(1) < 252)
    if usable.sum() < 8:
        return None
    design = np.concatenate([source[usable], np.ones((int(usable.sum()), 1))], axis=1)
    coef = np.linalg.lstsq(design, jittered[usable], rcond=None)[0]
    matrix, offset = coef[:3].T, coef[3]
    residual = float(np.abs(design @ coef - jittered[usable]).max())
    yiq = np.array(YIQ)
    gain = float(yiq[0] @ matrix @ np.ones(3))
    chroma = (yiq @ matrix @ np.linalg.inv(yiq))[1:, 1:] / gain
    grey = float((yiq[0] @ plain.reshape(3, -1).astype(np.float64)).mean())
    brightness = gain + float(offset.mean()) / grey
    return (
        brightness,
        gain / brightness,
        math.sqrt(abs(np.linalg.det(chroma))),
        math.atan2(chroma[0, 1], chroma[0, 0]) / (2 * math.pi),
        residual,
    )


def judge_geometry(
    found: list[tuple], views: int, spec: Any, width: int, height: int
) -> tuple[list[str], dict]:
    """What is wrong with view_geometry's estimates against `spec` (failures), and the figures (detail):
    crop area against the spec's own sampler (KS), aspect and rotation within range, flip rate ~0.5."""
    import numpy as np

    from pipelines.augment import sample_crop_box

    n = max(len(found), 1)
    area, aspect, flipped, angle = (
        [np.array(c, dtype=np.float64) for c in zip(*found, strict=True)] if found else [np.zeros(1)] * 4
    )
    rng = np.random.default_rng(0)
    reference = [
        w * h / (width * height)
        for _, _, w, h in (sample_crop_box(spec, width, height, rng) for _ in range(20000))
    ]
    (low, high), (narrow, wide), rotation = spec.crop_scale, spec.crop_ratio, spec.rotation_degrees
    flip_rate, ks, ks_max = float(flipped.mean()), ks_two_sample(area, reference), ks_limit(n, 20000) + 0.03
    turned = float(np.abs(angle).max())
    failures = [text for ok, text in (
        (len(found) >= 0.9 * views, f"only {len(found)} of {views} views measurable"),
        (low * 0.95 <= area.min() and area.max() <= high * 1.03,
         f"crop area {area.min():.3f}..{area.max():.3f}"),
        (ks <= ks_max, f"crop area distribution off the spec's sampler (KS {ks:.3f} > {ks_max:.3f})"),
        (narrow / 1.04 <= aspect.min() and aspect.max() <= wide * 1.04,
         f"aspect {aspect.min():.3f}..{aspect.max():.3f}"),
        (0.7 * rotation <= turned <= rotation + 0.5,
         f"rotation up to {turned:.1f} degrees (spec {rotation:g})"),
        (abs(angle.mean()) <= 4 * rotation / math.sqrt(3 * n), f"mean rotation {angle.mean():.2f} degrees"),
        (abs(flip_rate - 0.5) <= 2 / math.sqrt(n), f"flip rate {flip_rate:.3f}"),
    ) if not ok]  # fmt: skip
    return failures, {
        "views": len(found), "flip_rate": round(flip_rate, 3),
        "crop_area": f"{area.min():.3f}..{area.max():.3f} (spec {low:g}..{high:g})",
        "crop_area_ks": round(ks, 3), "crop_area_ks_limit": round(ks_max, 3),
        "aspect": f"{aspect.min():.3f}..{aspect.max():.3f} (spec {narrow:.3f}..{wide:.3f})",
        "rotation": f"{angle.min():.1f}..{angle.max():.1f} (spec +-{rotation:g})",
    }  # fmt: skip


def judge_colour(found: list[tuple], views: int, spec: Any) -> tuple[list[str], dict]:
    """What is wrong with view_colour's estimates against `spec`: each factor within its range and
    uniform over it (KS), and one affine colour map per view (fit residual)."""
    import numpy as np

    n = max(len(found), 1)
    columns = (
        [np.array(c, dtype=np.float64) for c in zip(*found, strict=True)] if found else [np.zeros(1)] * 5
    )
    failures = [] if len(found) >= 0.9 * views else [f"only {len(found)} of {views} views measurable"]
    detail: dict[str, Any] = {"views": len(found), "ks_limit": round(ks_limit(n) + 0.03, 3)}
    factors = (
        ("brightness", spec.brightness),
        ("contrast", spec.contrast),
        ("saturation", spec.saturation),
        ("hue", spec.hue),
    )
    for (name, v), values in zip(factors, columns[:4], strict=True):
        low, high, slack = (-v, v, 0.005) if name == "hue" else (max(0.0, 1 - v), 1 + v, 0.03)
        ks = ks_uniform(values, low, high)
        detail[name] = f"{values.min():.3f}..{values.max():.3f} (spec {low:g}..{high:g}), KS {ks:.3f}"
        if values.min() < low - slack or values.max() > high + slack or ks > ks_limit(n) + 0.03:
            failures.append(f"{name} {detail[name]}")
    detail["fit_residual"] = round(float(columns[4].max()), 2)
    if columns[4].max() > 3.0:
        failures.append(f"colour is not one affine map per view (residual {columns[4].max():.1f} levels)")
    return failures, detail


def check_geometry(ctx: Context) -> bool:
    """The imagenet-train spec's geometry (colour off) on the coordinate pattern, judged against the spec."""
    from pipelines.augment import get_spec

    spec = get_spec("imagenet-train")
    geometry_only = replace(spec, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    (views,) = pattern_views(ctx, ctx.need_data().geometry_shards, (geometry_only,), ctx.plan.stat_views)
    found = [g for g in (view_geometry(v, *GEOMETRY_SIZE) for v in views) if g is not None]
    failures, detail = judge_geometry(found, len(views), spec, *GEOMETRY_SIZE)
    return ctx.report.check("dali/geometry", not failures, failures=failures, **detail)


def check_colour(ctx: Context) -> bool:
    """The imagenet-train spec's colour jitter (no geometry) on the colour pattern, judged by the spec."""
    from pipelines.augment import AugmentSpec, get_spec

    spec = get_spec("imagenet-train")
    jitter = AugmentSpec(
        output_size=COLOUR_VIEW,
        brightness=spec.brightness,
        contrast=spec.contrast,
        saturation=spec.saturation,
        hue=spec.hue,
    )
    views, plain = pattern_views(
        ctx,
        ctx.need_data().colour_shards,
        (jitter, AugmentSpec(output_size=COLOUR_VIEW)),
        ctx.plan.stat_views,
    )
    found = [c for c in (view_colour(v, p) for v, p in zip(views, plain, strict=True)) if c is not None]
    failures, detail = judge_colour(found, len(views), spec)
    return ctx.report.check("dali/colour", not failures, failures=failures, **detail)


DALI_CHECKS = (
    ("dali/structure", check_structure),
    ("dali/eval_matches_torch", check_eval_view),
    ("dali/geometry", check_geometry),
    ("dali/colour", check_colour),
)


def part_dali_checks(ctx: Context) -> None:
    for name, check in DALI_CHECKS:
        try:
            check(ctx)
        except Exception as exc:  # each check stands alone: report it failed and go on
            ctx.report.check(name, False, error=_one_line(exc), traceback=traceback.format_exc()[-2000:])
        _release_memory()


def part_loader(ctx: Context) -> None:
    """Two-view DALI batches of the preset's size per second, delivered on the training device."""
    from pipelines import build_loaders

    plan = ctx.plan
    loaders = build_loaders(ctx.need_data().photo_shards, _data_config(plan), backend="dali")
    stream = _forever(loaders.train)
    for _ in range(plan.loader_warmup):
        next(stream)
    _sync()
    start, rows = time.perf_counter(), 0
    for _ in range(plan.loader_batches):
        rows += int(next(stream)["student"].shape[0])
    _sync()
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


# ------------------------------------------------------------------ the shipped step


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
            _sync()
            timed = time.perf_counter()
            self.run(step, inputs, self.plan.timed_steps)
            _sync()
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
            _sync()
            return True
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        self._steps.pop(batch, None)
        self.parts.optimizer.zero_grad(set_to_none=True)
        _release_memory()
        return False

    def rates_backing_off(self, batch: int, tries: int = 4) -> tuple[int, dict]:
        """rates() at `batch`, or at 1/8 less each time it runs out of memory."""
        for _ in range(tries):
            try:
                return batch, self.rates(batch)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
            self._steps.pop(batch, None)
            self.parts.optimizer.zero_grad(set_to_none=True)
            _release_memory()
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


# ------------------------------------------------------------------ EMA, end to end


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
        _sync()
        start = time.perf_counter()
        for _ in range(plan.ema_updates):
            update(teacher, student, 0.999, 10_000)  # past the ramp: alpha is the decay
        _sync()
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
    cfg = _data_config(plan, batch_size=batch, labeled_per_batch=labeled)
    shards = repeated_photo_shards(ctx, batch - labeled)
    stream = _forever(build_loaders(shards, cfg, backend="dali").train)
    step = rig.steps(batch)[0]
    steps = max(plan.e2e_steps * plan.batch // batch, 15)  # about as many images at any batch
    for _ in range(plan.e2e_warmup):
        rig.step_index = step(next(stream), rig.step_index).step
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        rig.step_index = step(next(stream), rig.step_index).step
    _sync()
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


# ------------------------------------------------------------------ mt-train: 30 steps, exact resume


@contextlib.contextmanager
def _deterministic() -> Iterator[list[str]]:
    """Deterministic kernels while the runs that must match run; yields the warnings of ops that have none."""
    import torch

    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield notes
        finally:
            notes.extend(
                sorted({_one_line(w.message)[:160] for w in caught if "determinis" in str(w.message)})
            )
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
            torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def _weights_difference(a: Path, b: Path) -> tuple[float, bool]:
    """(max abs difference, bitwise equal) between two safetensors files of the same tensors."""
    import torch
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    if first.keys() != second.keys():
        return float("inf"), False
    worst, equal = 0.0, True
    for key, tensor in first.items():
        other = second[key]
        equal = equal and torch.equal(tensor, other)
        if tensor.is_floating_point():
            worst = max(
                worst, float((tensor.double() - other.double()).abs().max()) if tensor.numel() else 0.0
            )
    return worst, equal


def part_mt_train(ctx: Context) -> None:
    """mt-train (its console entry) for 30 steps with the DALI backend, then 15 + a resume of 15: the
    resumed run's teacher and student must equal the straight run's."""
    from mt_scale.checkpoint import STUDENT_NAME, TEACHER_NAME, checkpoint_dirs
    from mt_scale.cli import train_main
    from shard_tools.pack import pack
    from shard_tools.samples import write_photo_tree

    plan, work = ctx.plan, ctx.work
    tree = write_photo_tree(
        work / "train-photos",
        count=plan.train_photos,
        num_classes=plan.train_classes,
        size=plan.train_photo_size,
        seed=1,
        with_val=True,
        val_count=plan.train_val,
    )
    shards = work / "train-shards"
    pack(tree, shards, labels_per_class=plan.train_labels_per_class, seed=0, progress=False)
    overrides = [
        f"run.shards={shards}", f"model.name={plan.train_model}", f"run.mixed_precision={plan.precision}",
        "run.batch_scope=per_device", f"data.batch_size={plan.batch}",
        f"data.labeled_per_batch={plan.labeled}", "data.backend=dali", f"data.workers={plan.loader_workers}",
        f"data.eval_batch_size={plan.train_val // 2}",
        "run.epochs=3", "optim.lr=0.025", "optim.initial_lr=0.0125", "optim.lr_rampup_epochs=1",
        "optim.lr_rampdown_epochs=4", "mt.consistency_rampup_epochs=1", "run.eval_every_epochs=0",
        "run.checkpoint_every_epochs=0", "run.log_every_steps=5",
    ]  # fmt: skip
    log = io.StringIO()

    def mt_train(run_dir: Path, *extra: str) -> int:
        argv = ["--preset", PRESET, "--no-progress", *extra]
        for value in (*overrides, f"run.output_dir={run_dir}"):
            argv += ["--set", value]
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return train_main(argv)

    straight, split = work / "run-straight", work / "run-split"
    with _deterministic() as notes:
        codes = [mt_train(straight), mt_train(split, "--stop-after-steps", "15"), mt_train(split, "--resume")]
    (work / "mt-train.log").write_text(log.getvalue())
    tail = log.getvalue().strip().splitlines()[-3:]
    report_file = straight / "report.json"
    summary = json.loads(report_file.read_text()) if report_file.is_file() else {}
    ran = codes == [0, 0, 0] and summary.get("steps") == 30 and bool(checkpoint_dirs(straight))
    ctx.report.check(
        "train/mt_train_30_steps",
        ran,
        exit_codes=codes,
        steps=summary.get("steps"),
        images_per_sec=summary.get("images_per_sec"),
        backend="dali",
        model=plan.train_model,
        log_tail=" / ".join(tail),
    )
    if not ran:
        ctx.report.check(
            "train/resume_exact", False, error="mt-train did not finish; see train/mt_train_30_steps"
        )
        return
    last_straight, last_split = checkpoint_dirs(straight)[-1], checkpoint_dirs(split)[-1]
    teacher, teacher_equal = _weights_difference(last_straight / TEACHER_NAME, last_split / TEACHER_NAME)
    student, student_equal = _weights_difference(last_straight / STUDENT_NAME, last_split / STUDENT_NAME)
    ctx.report.check(
        "train/resume_exact",
        last_split.name == last_straight.name and max(teacher, student) <= 1e-6,
        checkpoints=f"{last_straight.name} vs {last_split.name}",
        teacher_max_abs_diff=teacher,
        student_max_abs_diff=student,
        bitwise_equal=teacher_equal and student_equal,
        nondeterministic_ops=notes,
        limit="max abs difference <= 1e-6",
    )


# ------------------------------------------------------------------ the run


@dataclass
class Context:
    """What the parts share: the report, the plan, the work folder, the generated data, the largest batch."""

    report: Report
    plan: Plan
    work: Path
    data: Data | None = None
    max_batch: int | None = None

    def need_data(self) -> Data:
        if self.data is None:
            raise MtScaleError("the generated data is missing: the 'data' part failed or did not run")
        return self.data


# In order: correctness first, then the figures, torch.compile last (its time decides what fits the budget).
PARTS: tuple[tuple[str, Callable[[Context], None]], ...] = (
    ("data", part_data), ("dali_checks", part_dali_checks), ("loader", part_loader), ("steps", part_steps),
    ("ema", part_ema), ("end_to_end", part_end_to_end), ("mt_train", part_mt_train),
    ("compile", part_compile),
    ("summary", part_summary),
)  # fmt: skip


def run_part(ctx: Context, name: str, part: Callable[[Context], None]) -> None:
    """Run one part; a failure becomes a failed check `part/<name>` and the next part runs."""
    start = time.perf_counter()
    try:
        part(ctx)
    except Exception as exc:  # one failing part must not cost the figures of the others
        ctx.report.check(
            f"part/{name}", False, error=_one_line(exc), traceback=traceback.format_exc()[-3000:]
        )
        print(f"mt-bench gpu: part {name} failed: {_one_line(exc)}", file=sys.stderr, flush=True)
    finally:
        ctx.report.timings_s[name] = time.perf_counter() - start
        _release_memory()
        ctx.report.save()
    print(
        f"mt-bench gpu: {name} done in {time.perf_counter() - start:.0f} s "
        f"({ctx.report.elapsed():.0f} s so far)",
        file=sys.stderr,
        flush=True,
    )


def run_check(
    plan: Plan,
    *,
    json_path: Path | None = None,
    markdown_path: Path | None = None,
    work_dir: Path | None = None,
    parts: tuple[str, ...] = (),
) -> Report:
    """Every part of `plan` (or the named `parts`), in order; the report is saved after each."""
    absent = missing_modules()
    if absent:
        raise MtScaleError(
            f"this Python lacks {', '.join(absent)}: put their wheels in .whl/ and run make gpu-check "
            "(docs/performance.md, GPU check)"
        )
    import torch

    if not plan.dry_run and not torch.cuda.is_available():
        raise MtScaleError(
            "no CUDA GPU is visible to torch; run `mt-bench gpu --dry-run` for the CPU rehearsal"
        )
    unknown = sorted(set(parts) - {name for name, _ in PARTS})
    if unknown:
        raise MtScaleError(
            f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(n for n, _ in PARTS)}"
        )
    report = Report(plan, json_path, markdown_path, machine=describe_machine(plan))
    report.save()
    work = Path(tempfile.mkdtemp(prefix="mt-gpu-check-")) if work_dir is None else work_dir
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(report, plan, work)
    try:
        for name, part in PARTS:
            if not parts or name in parts or name == "data":  # the other parts need its data
                run_part(ctx, name, part)
    finally:
        report.machine["load_1min_end"] = round(os.getloadavg()[0], 2)
        report.save()
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mt-bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the same code on the CPU with tiny sizes (GPUs hidden): proves the kit, measures nothing",
    )
    parser.add_argument("--json", type=Path, help="write the figures as JSON here (after every part)")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument(
        "--work-dir", type=Path, help="keep generated images, shards and runs here (default: removed)"
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        metavar="DIR",
        help="first join split wheels in DIR and pip-install, offline, those this Python lacks",
    )
    parser.add_argument(
        "--target", type=Path, metavar="DIR", help="with --wheels: install into DIR (pip --target)"
    )
    parser.add_argument("--install-only", action="store_true", help="with --wheels: install, then stop")
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds the run may take; torch.compile parts that would "
        "overrun it are skipped (default 450 on a GPU, 600 in the dry run)",
    )
    parser.add_argument(
        "--parts", default="", help=f"comma-separated subset of: {', '.join(n for n, _ in PARTS)}"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`mt-bench gpu ...` and `python -m mt_scale.gpu_check ...`: 0 all checks passed, 1 a check failed,
    2 a user error (one line), 130 Ctrl-C. Goals missed are reported, not failed."""
    from shard_tools.errors import run_cli

    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list[1:] if args_list[:1] == ["gpu"] else args_list)
    interrupted = "interrupted (Ctrl-C); the JSON holds the parts that finished"
    return run_cli("mt-bench gpu", lambda: _main(args), interrupted=interrupted)


def _main(args: argparse.Namespace) -> int:
    if args.wheels is not None:
        prepare_wheels(args.wheels, target=args.target)
    if args.install_only:
        return 0
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.budget is not None:
        plan = replace(plan, budget_s=args.budget)
    if plan.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the same CPU rehearsal on any machine
    else:
        os.environ.setdefault(
            "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
        )  # before CUDA starts: deterministic resume
    for path in (args.json, args.markdown):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    parts = tuple(p for p in args.parts.split(",") if p)
    report = run_check(
        plan, json_path=args.json, markdown_path=args.markdown, work_dir=args.work_dir, parts=parts
    )
    data = report.as_dict()
    print(markdown(data), end="")
    return 0 if data["all_checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
