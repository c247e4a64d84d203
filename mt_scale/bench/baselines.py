"""The baselines: what a user would otherwise run.

A plain TarWriter loop (beside the packer); the reference code's loader (torchvision ImageFolder + PIL
+ its exact ImageNet train transform applied twice + a DataLoader with one worker per core); and the
decode-only ceiling (PIL decode of the same files, one process per core), which bounds any JPEG
pipeline on the machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path


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


def reference_epoch(loader: Iterable, device: str) -> int:
    """One epoch of the reference loader, both views moved to the training device."""
    import torch

    images = 0
    for (student, teacher), _labels in loader:
        student.to(device, non_blocking=True)
        teacher.to(device, non_blocking=True)
        images += int(student.shape[0])
    if device == "cuda":
        torch.cuda.synchronize()
    return images
