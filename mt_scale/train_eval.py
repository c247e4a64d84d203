"""The loop's evaluation: student and teacher scored on the val split, logged; labels checked.

mt_scale.train calls `evaluate_run` at the end of an epoch when due and at the finish of a completed
run; `checked_label_rows` checks every training and val batch, so a label outside the manifest's
classes stops the run with one line (docs/design.md: the loop).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from mt_scale.errors import MtScaleError
from mt_scale.evaluate import evaluate

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mt_scale.config import Config
    from mt_scale.preemption import StopRequest
    from mt_scale.report import MetricsWriter
    from pipelines import Loaders


def evaluate_run(
    accelerator: Accelerator,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    loaders: Loaders,
    cfg: Config,
    *,
    step: int,
    epoch: float,
    stop: StopRequest,
    metrics: MetricsWriter | None = None,
) -> dict[str, float]:
    """Student and teacher scores on the val split (every rank), logged at `step` by the main process.

    `student` is the prepared (possibly DDP-wrapped) model; `metrics` is the main process's writer
    (None elsewhere); `stop` says whether a stop signal may have killed the val loader's workers.
    """
    from mt_scale.teacher import average_buffers_over_ranks

    # BatchNorm statistics differ per rank until averaged; average so every rank scores one model.
    student = accelerator.unwrap_model(student)
    average_buffers_over_ranks(student)
    average_buffers_over_ranks(teacher)
    result: dict[str, float] = {}
    for name, model in (("student", student), ("teacher", teacher)):
        scores = _scores(accelerator, model, loaders, cfg, stop)
        result.update({f"{name}_{key}": value for key, value in scores.items() if key != "count"})
        result["val_count"] = scores["count"]
    row = {"step": step, "epoch": epoch, "kind": "eval", **result}
    if metrics is not None:
        metrics.write(row)
    accelerator.log({f"val/{k}": v for k, v in result.items() if k != "val_count"}, step=step)
    return result


def _scores(
    accelerator: Accelerator, model: torch.nn.Module, loaders: Loaders, cfg: Config, stop: StopRequest
) -> dict[str, float]:
    def once() -> dict[str, float]:
        batches = _checked_labels(loaders.val, loaders.num_classes, cfg.run.shards, "val")
        return evaluate(model, batches, accelerator, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std),
                        channels_last=bool(cfg.model.channels_last))  # fmt: skip

    try:
        return once()
    except MtScaleError:
        raise
    except Exception:
        if not stop.requested:
            raise
    # The stop signal killed the val loader's workers: this rank evaluates again (its one all-reduce
    # comes at the end, so the ranks stay in step).
    return once()


def checked_label_rows(labels: torch.Tensor, num_classes: int, shards: str, split: str) -> torch.Tensor:
    """`labels` (-1 = unlabeled), after checking every one names a class of the shard set."""
    if labels.device.type == "cpu":
        values = labels.numpy()  # host labels: checked without a torch op
        bad = (values >= num_classes) | (values < -1)
        if bad.any():
            raise _bad_label(int(values[bad][0]), num_classes, shards, split)
        return labels
    bad = (labels >= num_classes) | (labels < -1)
    if labels.numel() and bool(bad.any()):
        raise _bad_label(int(labels[bad][0]), num_classes, shards, split)
    return labels


class LabelCheck:
    """The training loop's label check: at once on the host, or a device flag read at log steps.

    Labels the loader left on the host (the PyTorch backend) are checked as they come, with no torch
    op; labels already on the device (DALI on a GPU) add to a device-side range read by
    `raise_if_bad`, so no batch waits for the device.
    """

    def __init__(self, num_classes: int, shards: str, split: str) -> None:
        self.num_classes, self.shards, self.split = num_classes, shards, split
        self._range: torch.Tensor | None = None  # [lowest, highest] label seen on the device

    def check(self, labels: torch.Tensor) -> None:
        if labels.device.type == "cpu" or not labels.numel():
            checked_label_rows(labels, self.num_classes, self.shards, self.split)
            return
        seen = torch.stack([labels.min(), labels.max()])
        if self._range is None:
            self._range = seen
        else:
            self._range = torch.stack([self._range[0].minimum(seen[0]), self._range[1].maximum(seen[1])])

    def raise_if_bad(self) -> None:
        """Raise the one-line error if a device batch held a label outside the classes (a host read)."""
        if self._range is None:
            return
        lowest, highest = self._range.tolist()
        self._range = None
        if highest >= self.num_classes:
            raise _bad_label(int(highest), self.num_classes, self.shards, self.split)
        if lowest < -1:
            raise _bad_label(int(lowest), self.num_classes, self.shards, self.split)


def _bad_label(value: int, num_classes: int, shards: str, split: str) -> MtScaleError:
    return MtScaleError(
        f"{shards}: a {split} batch holds label {value}, but the manifest lists {num_classes} classes "
        f"(labels 0..{num_classes - 1}); the set is damaged or mixes shards of another set: "
        f"check it with mt-shard verify --decode {shards}"
    )


def _checked_labels(batches: Iterable[dict], num_classes: int, shards: str, split: str) -> Iterator[dict]:
    for batch in batches:
        labels, valid = batch["label"], batch.get("valid")
        checked_label_rows(labels[valid.bool()] if valid is not None else labels, num_classes, shards, split)
        yield batch
