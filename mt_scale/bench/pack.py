"""`mt-bench pack`: the packer (1 and all workers, with and without max_side) vs a plain TarWriter loop."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mt_scale.bench.baselines import tarwriter_loop
from mt_scale.bench.common import Stopwatch, figure, option, positive, usable_cores
from mt_scale.bench.inputs import InputOptions, input_tree, list_images, pack_tree, training_folder


@dataclass
class PackOptions(InputOptions):
    max_side: int = option(256, "--max-side of the resizing variants", type=positive)


def run(options: PackOptions, work_dir: Path) -> list[dict]:
    tree = input_tree(options, work_dir)
    return bench_pack(tree, work_dir, options.repeats, options.max_side, options.workers)


def bench_pack(
    tree: Path, work_dir: Path, repeats: int, max_side: int, workers: int | None = None, shard_size: int = 100
) -> list[dict]:
    """Images/s of the packer with 1 and all workers, with and without max_side, and of the plain loop.

    The packer parallelises over shards, so a 1,000-image benchmark packs 100-image shards to stand
    for a real collection's many shards (ImageNet: 1,000 images each, over a thousand of them).
    Variants run interleaved within each repeat so a change in machine load hits them all alike.
    """
    workers = workers or usable_cores()
    samples = list_images(training_folder(tree))
    if (tree / "train").is_dir():
        samples += list_images(tree / "val")  # the packer writes the val part too
    variants: list[tuple[str, Callable[[Path], object], dict]] = []
    for suffix, side in (("", None), ("_max_side", max_side)):
        for label, count in (("1", 1), ("all", workers)):
            variants.append(
                (
                    f"pack/workers_{label}{suffix}",
                    lambda out, count=count, side=side: pack_tree(tree, out, count, side, shard_size),
                    {"workers": count, "max_side": side, "shard_size": shard_size},
                )
            )
    variants.append(
        (
            "pack/tarwriter_loop",
            lambda out: tarwriter_loop(samples, out, shard_size),
            {"workers": 1, "max_side": None, "shard_size": shard_size},
        )
    )
    rates: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    counts: dict[str, int] = {}
    for repeat in tqdm(range(repeats), desc="pack", unit="repeat"):
        for name, run, _ in variants:
            out = work_dir / f"pack-{repeat}-{name.split('/')[1]}"
            with Stopwatch() as watch:
                result = run(out)
            counts[name] = result if isinstance(result, int) else result.images
            rates[name].append(counts[name] / watch.seconds)
            shutil.rmtree(out, ignore_errors=True)
    return [figure(name, "img/s", rates[name], images=counts[name], **detail) for name, _, detail in variants]
