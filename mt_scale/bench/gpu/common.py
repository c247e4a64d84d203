"""Small helpers the parts share: synchronise, release memory, one-line errors, the loaders' data config."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

from mt_scale.bench.gpu.plan import Plan


def sync() -> None:
    """Wait for the GPU's queued work (timed regions start and end here); nothing on the CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_memory() -> None:
    """Give cached GPU memory back (torch's and DALI's) between parts and after running out of it."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        with contextlib.suppress(ImportError, AttributeError, RuntimeError):
            from nvidia.dali.backend import ReleaseUnusedMemory

            ReleaseUnusedMemory()


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line, at most 400 characters of message: what the report and stderr show."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}" if text else type(exc).__name__


def forever(loader: Any) -> Iterator[dict]:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def data_config(plan: Plan, **overrides: Any) -> Any:
    """The loaders' DataConfig for `plan` (the preset's augmentation specs and batch), with `overrides`."""
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
