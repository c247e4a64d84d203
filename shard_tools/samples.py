"""Generated ImageNet-style photo trees, for tests and throughput measurements (no download).

The pixels come from scikit-learn's two bundled sample photographs (china.jpg, flower.jpg). Each
class has its own photo, region and colour tint, so a classifier can in principle tell classes apart;
each image is a random crop of that region, resized to the requested size, maybe flipped, with
film grain added.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from shard_tools.files import atomic_write

GRAIN_STD = 6.0


def _base_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(image, dtype=np.uint8) for image in load_sample_images().images]


def class_name(index: int) -> str:
    """ImageNet-like folder names so trees look like the real thing."""
    return f"n{index:08d}"


def _class_styles(num_classes: int, photos: list[np.ndarray], rng: np.random.Generator) -> list[dict]:
    styles = []
    for index in range(num_classes):
        photo = index % len(photos)
        height, width = photos[photo].shape[:2]
        # A class-specific window (half the photo) and tint: classes differ in content and colour.
        styles.append(
            {
                "photo": photo,
                "top": int(rng.integers(0, height // 2 + 1)),
                "left": int(rng.integers(0, width // 2 + 1)),
                "height": height // 2,
                "width": width // 2,
                "tint": rng.uniform(0.6, 1.2, size=3),
            }
        )
    return styles


def _render(photos: list[np.ndarray], style: dict, size: tuple[int, int], rng: np.random.Generator) -> bytes:
    photo = photos[style["photo"]]
    out_w, out_h = size
    scale = rng.uniform(0.5, 1.0)
    crop_h = max(8, int(style["height"] * scale))
    crop_w = max(8, min(style["width"], int(crop_h * out_w / out_h)))
    top = style["top"] + int(rng.integers(0, style["height"] - crop_h + 1))
    left = style["left"] + int(rng.integers(0, style["width"] - crop_w + 1))
    crop = photo[top : top + crop_h, left : left + crop_w].astype(np.float32) * style["tint"]
    image = np.asarray(Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize((out_w, out_h), Image.BICUBIC))
    # Film grain: upscaled crops alone compress far better than real photos; with it the files
    # come nearer ImageNet's sizes, so decode and pack timings are more honest.
    grain = rng.standard_normal(image.shape, dtype=np.float32) * GRAIN_STD
    image = Image.fromarray(np.clip(image + grain, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_photo_tree(
    dest: str | Path,
    count: int = 2000,
    num_classes: int = 10,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
    with_val: bool = False,
    val_count: int | None = None,
) -> Path:
    """Write `dest/train/<class>/*.JPEG` (and `dest/val/<class>/*.JPEG` when with_val); return dest.

    `count` training images (and `val_count`, default count // 5, val images) are spread over the
    classes as evenly as possible; `size` is (width, height). The same arguments give the same bytes.
    """
    dest = Path(dest)
    rng = np.random.default_rng(seed)
    photos = _base_photos()
    styles = _class_styles(num_classes, photos, rng)
    splits = [("train", count)]
    if with_val:
        splits.append(("val", count // 5 if val_count is None else val_count))
    for split, total in splits:
        for index in range(total):
            label = index % num_classes
            folder = dest / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            data = _render(photos, styles[label], size, rng)
            target = folder / f"{split}_{index:06d}.JPEG"
            atomic_write(target, data)
    return dest
