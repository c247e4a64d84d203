"""`mt-bench pipeline`: two-view loading by each backend vs the reference loader and the decode ceiling."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mt_scale.bench.baselines import decode_epoch, reference_epoch, reference_loader
from mt_scale.bench.common import Stopwatch, figure, machine_load, option, positive, usable_cores
from mt_scale.bench.inputs import InputOptions, input_tree, list_images, pack_tree, training_folder
from shard_tools.files import atomic_output


@dataclass
class PipelineOptions(InputOptions):
    batch_size: int = option(64, "rows per batch", type=positive)
    labeled_per_batch: int = option(16, "labeled rows per batch", type=positive)
    backends: str = option("dali,torch", "comma-separated backends (dali,torch)")
    source: str = option("local", "local, or s3: each backend from a local moto S3 server vs local disk",
                         choices=("local", "s3"))


def run(options: PipelineOptions, work_dir: Path) -> list[dict]:
    tree = input_tree(options, work_dir)
    backends = tuple(name.strip() for name in options.backends.split(",") if name.strip())
    if options.source == "s3":
        from mt_scale.bench.s3 import bench_s3_source

        return bench_s3_source(tree, work_dir, options.repeats, options.batch_size, options.labeled_per_batch,
                               options.workers, backends)
    results = bench_pipeline(
        tree, work_dir, options.repeats, batch_size=options.batch_size,
        labeled_per_batch=options.labeled_per_batch, workers=options.workers, backends=backends,
    )  # fmt: skip
    return results + derived_figures(results)


def _training_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _our_loader_epoch(loaders, device: str) -> int:
    """One epoch of a backend: uint8 views on the training device, as mt_scale.train receives them."""
    images = 0
    for batch in loaders.train:
        batch["student"].to(device, non_blocking=True)
        batch["teacher"].to(device, non_blocking=True)
        images += int(batch["student"].shape[0])
    _sync(device)
    return images


def _normalized_epoch(loaders, device: str, mean, std) -> int:
    """The same, plus the trainer's float conversion and normalisation of both views on the device."""
    from pipelines import normalize

    images = 0
    for batch in loaders.train:
        normalize(batch["student"].to(device, non_blocking=True), mean, std)
        normalize(batch["teacher"].to(device, non_blocking=True), mean, std)
        images += int(batch["student"].shape[0])
    _sync(device)
    return images


def bench_pipeline(
    tree: Path,
    work_dir: Path,
    repeats: int,
    batch_size: int = 64,
    labeled_per_batch: int = 16,
    workers: int | None = None,
    backends: tuple[str, ...] = ("dali", "torch"),
) -> list[dict]:
    """Two-view training images/s: our backends, the reference-style loader and the decode ceiling.

    The backends hand over uint8 views; the design puts float conversion and normalisation on the
    training device inside the step, while the reference does it in its workers. So the backend this
    machine trains with (`auto`) is also measured with `pipelines.normalize` of both views added
    (`pipeline/<backend>_normalized`): on a CPU-only machine that work lands on the same cores.
    Every contender runs one untimed warm-up epoch, then `repeats` timed epochs interleaved (DALI's as a
    group after the others); an epoch is timed from asking for its first batch to its last (worker
    start-up included for all alike).
    """
    from pipelines import build_loaders, resolve_backend
    from pipelines.config import DataConfig

    workers = workers or usable_cores()
    load_at_start = machine_load("pipeline")
    device = _training_device()
    train_dir = training_folder(tree)
    samples = list_images(train_dir)
    shard_dir = work_dir / "pipeline-shards"
    shutil.rmtree(shard_dir, ignore_errors=True)  # --work-dir may hold a set packed from another tree
    pack_tree(tree, shard_dir, workers)  # the packer's defaults, as a user packs
    cfg = DataConfig(
        batch_size=batch_size,
        labeled_per_batch=labeled_per_batch,
        student_aug="imagenet-train",
        teacher_aug="imagenet-train",
        eval_aug="imagenet-eval",
        workers=workers,
        seed=0,
    )
    auto = resolve_backend("auto")
    contenders: list[tuple[str, Callable[[], int], dict]] = []
    for backend in backends:
        loaders = build_loaders(shard_dir, cfg, backend=backend)
        detail = {"backend": loaders.backend, "workers": workers, "batch_size": batch_size, "device": device}
        contenders.append((f"pipeline/{backend}", lambda ld=loaders: _our_loader_epoch(ld, device), detail))
        if backend == auto:
            contenders.append(
                (
                    f"pipeline/{backend}_normalized",
                    lambda ld=loaders: _normalized_epoch(ld, device, cfg.mean, cfg.std),
                    {**detail, "includes": "pipelines.normalize of both views"},
                )
            )
    reference = reference_loader(train_dir, batch_size, workers)
    contenders.append(
        (
            "pipeline/reference",
            lambda: reference_epoch(reference, device),
            {"workers": workers, "batch_size": batch_size, "transform": "reference ImageNet train, twice"},
        )
    )
    paths = [str(path) for path, _ in samples]
    pool = multiprocessing.get_context("fork").Pool(workers)
    contenders.append(
        (
            "pipeline/decode_ceiling",
            lambda: decode_epoch(pool, paths),
            {"processes": workers, "decoder": "PIL"},
        )
    )
    try:
        rates: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
        counts: dict[str, int] = {}
        # DALI's contenders go last, as a group of their own: once a DALI pipeline has run in this
        # process, the torch backend starts its workers from a forkserver (pipelines.workers), so the
        # torch contenders are timed with the forked workers a process without DALI gets.
        groups = [[c for c in contenders if not c[0].startswith("pipeline/dali")],
                  [c for c in contenders if c[0].startswith("pipeline/dali")]]
        for group in (g for g in groups if g):
            for _name, run, _ in tqdm(group, desc="pipeline warm-up", unit="loader"):
                run()
            for _ in tqdm(range(repeats), desc="pipeline", unit="repeat"):
                for name, run, _ in group:
                    with Stopwatch() as watch:
                        counts[name] = run()
                    rates[name].append(counts[name] / watch.seconds)
    finally:
        pool.terminate()
        pool.join()
    load = {"load_1min_start": load_at_start, "load_1min_end": os.getloadavg()[0]}
    return [
        figure(
            name, "img/s", rates[name], images_per_epoch=counts[name], source_images=len(samples), **detail, **load
        )
        for name, _, detail in contenders
    ]


def derived_figures(results: list[dict]) -> list[dict]:
    """Best backend vs the reference and vs the ceiling, per repeat (the contenders ran interleaved)."""
    by_name = {result["name"]: result for result in results}
    baselines = ("pipeline/reference", "pipeline/decode_ceiling")
    backends = [r for r in results if r["name"] not in baselines and not r["name"].endswith("_normalized")]
    if not backends or "pipeline/reference" not in by_name:
        return []
    best = max(backends, key=lambda r: r["median"])
    derived = [
        figure(
            "pipeline/best_vs_reference",
            "x",
            [b / r for b, r in zip(best["values"], by_name["pipeline/reference"]["values"], strict=True)],
            best=best["name"],
            device=best["detail"].get("device"),
        )
    ]
    if "pipeline/decode_ceiling" in by_name:
        derived.append(
            figure(
                "pipeline/best_vs_ceiling",
                "fraction",
                [
                    b / c
                    for b, c in zip(best["values"], by_name["pipeline/decode_ceiling"]["values"], strict=True)
                ],
                best=best["name"],
                device=best["detail"].get("device"),
            )
        )
    return derived


def plot_pipeline(results: list[dict], path: Path, title: str = "") -> None:
    """Horizontal bars of two-view images/s (median, with min-max whiskers) for every loader."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["decode_ceiling", "torch", "torch_normalized", "dali", "dali_normalized", "reference"]
    bars = [r for name in order for r in results if r["name"] == f"pipeline/{name}"]
    labels = {
        "decode_ceiling": "decode-only ceiling\n(PIL, no augmentation)",
        "reference": "reference loader (float views)\nImageFolder + PIL, transform x2",
    }
    for backend in ("torch", "dali"):
        labels[backend] = f"mt-scale {backend} backend\n(uint8 views)"
        labels[f"{backend}_normalized"] = f"mt-scale {backend} backend\n+ normalize (float views)"
    fig, ax = plt.subplots(figsize=(8, 0.9 * len(bars) + 1.2))
    medians = [r["median"] for r in bars]
    errors = [[r["median"] - r["min"] for r in bars], [r["max"] - r["median"] for r in bars]]

    def colour(name: str) -> str:
        if name.endswith(("ceiling", "reference")):
            return "#999999" if name.endswith("ceiling") else "#c44e52"
        return "#8fa9d4" if name.endswith("_normalized") else "#4c72b0"

    colors = [colour(r["name"]) for r in bars]
    ax.barh(range(len(bars)), medians, xerr=errors, color=colors, capsize=4)
    ax.set_yticks(range(len(bars)), [labels[r["name"].split("/", 1)[1]] for r in bars])
    ax.invert_yaxis()
    for index, value in enumerate(medians):
        ax.text(bars[index]["max"], index, f"  {value:,.0f}", va="center")
    ax.set_xlabel("training images/s (two augmented views each; decode ceiling: one decode)")
    ax.set_xlim(0, max(r["max"] for r in bars) * 1.18)
    ax.set_title(title or "Two-view ImageNet-style loading")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_output(path) as temp:
            fig.savefig(temp, dpi=110, format="png")
    finally:
        plt.close(fig)
