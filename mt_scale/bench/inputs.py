"""The images the pack and pipeline stages measure: a given ImageFolder tree or generated photos."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mt_scale.bench.common import StageOptions, image_size, option, positive
from mt_scale.errors import MtScaleError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class InputOptions(StageOptions):
    images: Path | None = option(None, "an ImageFolder-style tree of JPEGs instead of generated ones",
                                 shared=True, shown="generated", type=Path)  # fmt: skip
    count: int = option(1000, "generated images", shared=True, type=positive)
    size: tuple[int, int] = option((500, 375), "generated image size WxH", shared=True, type=image_size)
    workers: int | None = option(None, "processes for 'all workers'", shared=True, shown="usable cores", type=positive)
    seed: int = option(0, "seed of the generated images", shared=True, type=int)


def input_tree(options: InputOptions, work_dir: Path) -> Path:
    return prepare_tree(options.images, work_dir, options.count, options.size, options.seed)


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
