"""Counts what would make the training loop wait for a GPU: host reads of computed tensors, collectives.

On a CPU every tensor is on the host, so a read is free here; what matters is where the loop reads.
`SyncCounter` patches the ways a tensor's value reaches Python (`item`, `tolist`, `numpy`, `cpu`,
`float()`, `int()`, `bool()`) and torch.distributed's collectives, and attributes each call to the
number of step calls done so far (and whether it came from inside a step). Reads of the batch the
loader produced (the host-side labels) are not counted: on a GPU they are still on the host.
Used in-process by test_no_device_wait.py and inside each rank of test_distributed.py.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import mt_scale.train as train_module
from mt_scale.step import MeanTeacherStep

READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__")
LOADER_CODE = str(Path(__import__("pipelines").__file__).parent)  # host work of in-process loading
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter_tensor", "gather", "scatter", "barrier",
               "monitored_barrier")  # fmt: skip


class SyncCounter:
    """{(steps done, inside a step): Counter of what was called} for reads and collectives, while active."""

    def __init__(self) -> None:
        self.reads: dict[tuple[int, bool], Counter] = {}
        self.collectives: dict[tuple[int, bool], Counter] = {}
        self.steps_done = 0
        self.inside_step = False
        self.stepped: list[int] = []  # the optimizer step count after each step call
        self._batch_storages: set[int] = set()
        self._saved: list[tuple[Any, str, Any]] = []

    def _record(self, table: dict, name: str) -> None:
        if threading.current_thread() is threading.main_thread():
            table.setdefault((self.steps_done, self.inside_step), Counter())[name] += 1

    def __enter__(self) -> SyncCounter:
        for name in READS:
            self._patch(torch.Tensor, name, self._read_wrapper(name, getattr(torch.Tensor, name)))
        for name in COLLECTIVES:
            if hasattr(dist, name):
                self._patch(dist, name, self._collective_wrapper(name, getattr(dist, name)))
        self._patch(MeanTeacherStep, "__call__", self._step_wrapper(MeanTeacherStep.__call__))
        self._patch(train_module, "next_batch", self._batch_wrapper(train_module.next_batch))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def _read_wrapper(self, name: str, original: Any) -> Any:
        counter = self

        def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.untyped_storage().data_ptr() not in counter._batch_storages and not _in_loader():
                counter._record(counter.reads, name)
            return original(tensor, *args, **kwargs)

        return read

    def _collective_wrapper(self, name: str, original: Any) -> Any:
        def collective(*args: Any, **kwargs: Any) -> Any:
            self._record(self.collectives, name)
            return original(*args, **kwargs)

        return collective

    def _step_wrapper(self, original: Any) -> Any:
        counter = self

        def step(self_: MeanTeacherStep, *args: Any, **kwargs: Any) -> Any:
            counter.inside_step = True
            try:
                out = original(self_, *args, **kwargs)
            finally:
                counter.inside_step = False
            counter.steps_done += 1
            counter.stepped.append(out.step)
            return out

        return step

    def _batch_wrapper(self, original: Any) -> Any:
        def next_batch(*args: Any, **kwargs: Any) -> Any:
            batch, batches = original(*args, **kwargs)
            self._batch_storages = {value.untyped_storage().data_ptr() for value in batch.values()
                                    if isinstance(value, torch.Tensor)}  # fmt: skip
            return batch, batches

        return next_batch

    def at(self, table: dict, steps_done: int) -> int:
        """How many calls were made right after step call `steps_done` (outside any step)."""
        return sum(table.get((steps_done, False), Counter()).values())

    def between(self, table: dict, allowed_after: set[int]) -> dict[tuple[int, bool], Counter]:
        """The calls made inside a step, or after step call N for N not in `allowed_after` (0 = setup)."""
        return {key: calls for key, calls in table.items()
                if key[1] or (key[0] not in allowed_after and key[0] != 0)}  # fmt: skip


def _in_loader() -> bool:
    """Whether the caller is the loader's own host-side work (data.workers=0 runs it in this process)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(LOADER_CODE):
            return True
        frame = frame.f_back
    return False
