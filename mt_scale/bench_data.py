"""mt-bench's data stages: packing vs a plain TarWriter loop, and two-view loading vs the reference loader.

The baselines live here because they are what a user would otherwise run: the reference code's
loader (torchvision ImageFolder + PIL + its exact ImageNet train transform applied twice + a
DataLoader with one worker per core) and the decode-only ceiling (PIL decode of the same files in one
process per core, nothing else), which bounds any JPEG pipeline on this CPU.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from tqdm import tqdm

from mt_scale.bench_common import Stopwatch, figure, usable_cores
from mt_scale.errors import MtScaleError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------- inputs


def prepare_tree(
    images: str | Path | None, work_dir: Path, count: int, size: tuple[int, int], seed: int
) -> Path:
    """The ImageFolder-style tree to measure: `images` as given, or photos generated into work_dir."""
    if images is not None:
        root = Path(images)
        if not training_folder(root).is_dir() or not list_images(training_folder(root)):
            raise MtScaleError(
                f"{root}: no ImageFolder-style tree of JPEGs (<dir>/<class>/*.jpg or <dir>/train/<class>/*.jpg); "
                "point --images at one, or leave it out to generate photos"
            )
        return root
    from shard_tools.samples import write_photo_tree

    root = work_dir / f"photos-{count}-{size[0]}x{size[1]}-seed{seed}"
    if not training_folder(root).is_dir():
        write_photo_tree(root, count=count, num_classes=10, size=size, seed=seed)
    return root


def training_folder(root: Path) -> Path:
    """ImageNet layout keeps the training classes under train/; a bare class tree is its own train set."""
    return root / "train" if (root / "train").is_dir() else root


def list_images(train_dir: Path) -> list[tuple[Path, int]]:
    """(path, class index) for every image, in torchvision ImageFolder's order (sorted classes, files)."""
    classes = (
        sorted(entry.name for entry in train_dir.iterdir() if entry.is_dir()) if train_dir.is_dir() else []
    )
    samples = []
    for index, name in enumerate(classes):
        for path in sorted((train_dir / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                samples.append((path, index))
    return samples


def pack_tree(
    tree: Path, out_dir: Path, workers: int, max_side: int | None = None, shard_size: int | None = None
):
    """The product's packer (what `mt-shard pack` runs), quiet, on the benchmark tree.

    Every image goes into the set (no val carved out of a tree that has no val/ folder), so the
    packer, the TarWriter loop and the loaders all handle the same samples. `shard_size` None: the
    packer's default, as a user packs.
    """
    from shard_tools.pack import pack

    has_val = (tree / "train").is_dir() and (tree / "val").is_dir()
    sizing = {} if shard_size is None else {"shard_size": shard_size}
    return pack(
        tree,
        out_dir,
        label_fraction=0.25,
        seed=0,
        val_fraction=None if has_val else 0.0,
        max_side=max_side,
        workers=workers,
        progress=False,
        **sizing,
    )


# --------------------------------------------------------------------------- pack


def tarwriter_loop(samples: list[tuple[Path, int]], out_dir: Path, shard_size: int = 1000) -> int:
    """The plain alternative to the packer: one process, webdataset's TarWriter, same members per sample."""
    import webdataset as wds

    from shard_tools.format import CLASS_EXT, IMAGE_EXT, LABEL_EXT, encode_class, encode_label

    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for start in range(0, len(samples), shard_size):
        with wds.TarWriter(str(out_dir / f"loop-{start // shard_size:06d}.tar")) as sink:
            for path, label in samples[start : start + shard_size]:
                sink.write(
                    {
                        "__key__": f"{written:09d}",
                        IMAGE_EXT: path.read_bytes(),
                        CLASS_EXT: encode_class(label),
                        LABEL_EXT: encode_label(label),
                    }
                )
                written += 1
    return written


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


# --------------------------------------------------------------------------- pipeline baselines


class TransformTwice:
    """Two independent draws of one transform: the reference's student and teacher views."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


def reference_train_transform() -> Callable:
    """The reference code's ImageNet training transform (mean_teacher/datasets.py, imagenet())."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomRotation(10),
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )


def reference_loader(train_dir: Path, batch_size: int, workers: int) -> Iterable:
    import torch
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(train_dir), transform=TransformTwice(reference_train_transform()))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)


def _decode(path: str) -> int:
    from PIL import Image

    # torchvision's pil_loader does exactly this: open, convert to RGB (which decodes).
    with open(path, "rb") as handle:
        image = Image.open(handle).convert("RGB")
    return image.width


def decode_epoch(pool, paths: list[str]) -> int:
    return sum(1 for _ in pool.imap_unordered(_decode, paths, chunksize=16))


# --------------------------------------------------------------------------- pipeline


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


def _reference_epoch(loader, device: str) -> int:
    images = 0
    for (student, teacher), _labels in loader:
        student.to(device, non_blocking=True)
        teacher.to(device, non_blocking=True)
        images += int(student.shape[0])
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
    Every contender runs one untimed warm-up epoch, then `repeats` timed epochs interleaved; an epoch
    is timed from asking for its first batch to its last (worker start-up included for all alike).
    """
    from pipelines import build_loaders, resolve_backend
    from pipelines.config import DataConfig

    workers = workers or usable_cores()
    load_at_start = machine_load()
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
            lambda: _reference_epoch(reference, device),
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
        for _name, run, _ in tqdm(contenders, desc="pipeline warm-up", unit="loader"):
            run()
        for _ in tqdm(range(repeats), desc="pipeline", unit="repeat"):
            for name, run, _ in contenders:
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


def machine_load() -> float:
    """The 1-minute load average now, with a loud stderr warning when over half the usable cores are busy."""
    load, cores = os.getloadavg()[0], usable_cores()
    if load > cores / 2:
        print(
            f"mt-bench pipeline: WARNING: the 1-minute load average is {load:.2f} on {cores} cores: this machine "
            "is busy, so the figures will be low and noisy; rerun on a quiet machine",
            file=sys.stderr,
        )
    return load
