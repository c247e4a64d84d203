"""Main-process loader objects: epoch length, resume position and rank padding, shared by both backends."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from pipelines.mixing import resume_skips


class TrainLoader:
    """One pass = one epoch of exactly `len(self)` two-view batches (the same count on every rank).

    `open_epoch(epoch, skips)` returns an iterable of batch dicts carrying `_worker`/`_index`
    (which worker produced the batch and its position in that worker's epoch) and `_skipped`
    (undecodable images replaced by the next sample). Iterating to the end advances the epoch;
    `set_epoch` sets it explicitly.
    """

    def __init__(self, open_epoch: Callable[[int, list[int]], Iterable[dict]], quotas: Callable[[int], list[int]],
                 batches_per_epoch: int, world_size: int, workers: int) -> None:
        self._open_epoch, self._quotas = open_epoch, quotas
        self._len, self.world_size, self.workers = batches_per_epoch, world_size, workers
        self.epoch = 0
        self.skipped = 0  # images that failed to decode and were replaced, since construction
        self._done = [0] * workers
        self._yielded = 0
        self._resume: dict | None = None

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resume = None
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        quotas = self._quotas(self.epoch)
        skips = [0] * self.workers
        if self._resume is not None and self._resume.get("epoch") == self.epoch:
            skips = resume_skips(self._resume, quotas, self.world_size, self.workers)
        self._resume = None
        self._done, self._yielded = list(skips), sum(skips)
        if self._yielded < self._len:
            for batch in self._open_epoch(self.epoch, skips):
                worker, index = batch.pop("_worker"), batch.pop("_index")
                self.skipped += batch.pop("_skipped")
                self._done[worker] = index + 1
                self._yielded += 1
                yield batch
                if self._yielded >= self._len:
                    break
        self.epoch += 1
        self._done, self._yielded = [0] * self.workers, 0

    def state_dict(self) -> dict:
        """The data position: epoch and batches each worker has delivered (taken by the consumer)."""
        return {"epoch": self.epoch, "worker_batches": list(self._done), "batches_done": self._yielded,
                "batches_per_epoch": self._len, "world_size": self.world_size, "workers": self.workers}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._resume = dict(state)


class ValLoader:
    """Eval batches; every rank yields `len(self)` batches of the same shape.

    Rows with `valid == False` are padding (label -1): the tail of a worker's last batch and whole
    batches that even out ranks holding fewer val samples. Valid rows are each val sample exactly once
    across ranks.
    """

    def __init__(self, open_pass: Callable[[], Iterable[dict]], batches: int, empty_batch: Callable[[], dict]) -> None:
        self._open_pass, self._len, self._empty_batch = open_pass, batches, empty_batch
        self.skipped = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        count = 0
        for batch in self._open_pass():
            self.skipped += batch.pop("_skipped", 0)
            count += 1
            yield batch
        for _ in range(self._len - count):
            yield self._empty_batch()


@dataclass
class Loaders:
    train: TrainLoader
    val: ValLoader
    num_classes: int
    class_names: list[str]
    backend: str
    info: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"train": self.train.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.train.load_state_dict(state["train"])

    def set_epoch(self, epoch: int) -> None:
        self.train.set_epoch(epoch)
