"""scikit-learn's digits (1,797 8x8 images, 10 classes) as a source: no download, shipped with the library."""

from __future__ import annotations

import io

from shard_tools.sources.base import Collection, Item

DIGITS = "digits"
DIGITS_SIZE = 32


def digits_jpegs(quality: int = 95) -> tuple[list[bytes], list[int]]:
    """scikit-learn's 1,797 digits as 32x32 RGB JPEGs (bicubic upscale of the 8x8, 0..16 images)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    encoded = []
    for image in images:
        big = Image.fromarray(image, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC).convert("RGB")
        buffer = io.BytesIO()
        big.save(buffer, format="JPEG", quality=quality)
        encoded.append(buffer.getvalue())
    return encoded, [int(t) for t in digits.target]


def digits_collection() -> Collection:
    """The digits as a Collection: keys digits-NNNNN, classes "0".."9", no val part (held out by fraction)."""
    encoded, targets = digits_jpegs()
    items = [
        Item(f"digits-{index:05d}", label, f"digits/{index}", data=data)
        for index, (data, label) in enumerate(zip(encoded, targets, strict=True))
    ]
    return Collection("scikit-learn digits", [str(d) for d in range(10)], items, None, 0.3)
