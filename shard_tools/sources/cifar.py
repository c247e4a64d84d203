"""CIFAR-10 from `cifar-10-binary.tar.gz` as downloaded, without extracting it.

The batches are decoded in memory (records of 1 label byte + the R, G and B 32x32 planes) and
stored as JPEG quality 95 without chroma subsampling. Origins follow the reference's unpacked names
(`train/<class>/<n>_<class>.png`, n counting over data_batch_1..5), so its label files
(`16002_airplane.png airplane`) work with `--labels`. The python version of the archive holds
pickles and is refused (archive_files.archive_layout): nothing here unpickles.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from shard_tools.format import ShardFormatError
from shard_tools.sources.archive_files import CIFAR_BINARY_URL, CIFAR_DIR, small_members
from shard_tools.sources.base import Collection, Item, check_class_names

CIFAR_TRAIN = [f"data_batch_{n}.bin" for n in range(1, 6)]
CIFAR_TEST = "test_batch.bin"
CIFAR_META = "batches.meta.txt"
CIFAR_SIDE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE
CIFAR_QUALITY = 95


def encode_rgb(pixels: np.ndarray) -> bytes:
    """JPEG bytes (quality 95, no chroma subsampling) of an HxWxRGB uint8 image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=CIFAR_QUALITY, subsampling=0)
    return buffer.getvalue()


def cifar_records(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(labels, HxWxRGB uint8 images) of a CIFAR-10 binary batch."""
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD)
    images = records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)
    return records[:, 0], np.ascontiguousarray(images)


def load_cifar(path: Path) -> Collection:
    """The Collection of `cifar-10-binary.tar.gz`: data_batch_1..5 to train, test_batch to val."""
    names = [*CIFAR_TRAIN, CIFAR_TEST, CIFAR_META]
    wanted = {f"{CIFAR_DIR}/{name}": name for name in names}
    files = small_members(path, wanted.get)
    missing = [name for name in names if name not in files]
    if missing:
        raise ShardFormatError(f"{path}: no {CIFAR_DIR}/{missing[0]}; download {CIFAR_BINARY_URL} again")
    classes = [line.strip() for line in files[CIFAR_META].decode("ascii", "replace").splitlines() if line.strip()]
    check_class_names(classes, f"{path}: {CIFAR_META}")
    parts: dict[str, list[Item]] = {"train": [], "test": []}
    for part, batch_names in (("train", CIFAR_TRAIN), ("test", [CIFAR_TEST])):
        for batch in batch_names:
            raw = files[batch]
            if not raw or len(raw) % CIFAR_RECORD:
                raise ShardFormatError(f"{path}: {batch} is not a whole number of {CIFAR_RECORD}-byte records; "
                                       f"download {CIFAR_BINARY_URL} again")
            labels, images = cifar_records(raw)
            if int(labels.max()) >= len(classes):
                raise ShardFormatError(f"{path}: {batch} holds class {int(labels.max())}, but {CIFAR_META} names "
                                       f"{len(classes)} classes; download {CIFAR_BINARY_URL} again")
            for label, image in zip(labels.tolist(), images, strict=True):
                number, name = len(parts[part]), classes[label]
                parts[part].append(Item(f"cifar-{part}-{number:05d}", label, f"{part}/{name}/{number}_{name}.png",
                                        data=encode_rgb(image)))
    collection = Collection(f"archive {path}", classes, parts["train"], parts["test"], 0.0)
    collection.val_method = "archive"
    return collection
