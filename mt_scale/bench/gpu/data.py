"""The generated data: ImageNet-size photos packed with the packer's defaults, and two test patterns' shards."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mt_scale.bench.gpu.plan import Context

GEOMETRY_SIZE = (512, 384)  # (width, height) of the coordinate pattern; not square, so a swapped axis shows
COLOUR_VIEW = (96, 288)  # the colour pattern's 3 x 9 patches, 32 output pixels each
COLOUR_LEVELS = (70, 110, 150)  # 27 mid-range colours: most stay unclamped under +-40% jitter


@dataclass
class Data:
    """The generated sets the parts read: the photos' shards and the two patterns' labeled shards."""

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
