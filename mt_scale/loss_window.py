"""The training loop's running loss terms between two log steps, kept on the device they come from."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch

from mt_scale.report import loss_column


class LossWindow:
    """The loss terms of the steps since the last logged row: their means per batch and the img/s.

    `add` sums on the device the terms come from (no host read); `read` copies the sums to the host
    once, at a log step or before a checkpoint.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.names: tuple[str, ...] = ()
        self._sums: torch.Tensor | None = None
        self._read: dict[str, float] | None = None
        self.batches = 0
        self.started = time.perf_counter()

    def add(self, losses: Mapping[str, torch.Tensor | float]) -> None:
        values = [value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                  for value in losses.values()]  # fmt: skip
        stacked = torch.stack([value.detach().float().reshape(()) for value in values])
        if self._sums is None:
            self.names, self._sums = tuple(losses), stacked
        else:
            self._sums = self._sums + stacked
        self._read = None
        self.batches += 1

    def read(self) -> dict[str, float]:
        """{loss term: sum over the window's batches}, read from the device once per window state."""
        if self._read is None:
            totals = self._sums.tolist() if self._sums is not None else []
            self._read = dict(zip(self.names, totals, strict=True))
        return self._read

    def finite(self) -> bool:
        """Whether every term stayed finite (a host read of the sums)."""
        return all(math.isfinite(value) for value in self.read().values())

    def means(self) -> dict[str, float]:
        """{metrics column: mean per batch} of every loss term."""
        return {loss_column(name): total / self.batches for name, total in self.read().items()}

    def images_per_sec(self, images_per_batch: int) -> float:
        return self.batches * images_per_batch / max(time.perf_counter() - self.started, 1e-9)
