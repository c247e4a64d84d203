"""Pre-emption: SIGTERM stops training at the next step boundary that every rank agrees on.

The loop then writes a checkpoint and mt-train exits with EXIT_PREEMPTED; loader workers the signal
killed are reopened at their position, so `--resume` continues exactly (docs/design.md: checkpoints).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch

from shard_tools.errors import EXIT_INTERRUPTED as EXIT_INTERRUPTED  # Ctrl-C

EXIT_PREEMPTED = (
    143  # 128 + SIGTERM: what a shell reports for a process SIGTERM ended; a checkpoint was written
)


def _ignore_child(signum: int, frame: Any) -> None:
    """SIGCHLD after SIGTERM: a loader worker died of the same signal; found at the next fetch."""


class StopRequest:
    """Set by SIGTERM; `install()` in the main thread, `restore()` when training ends."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.installed = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> StopRequest:
        # signal.signal works in the main thread only; elsewhere (a caller's thread) SIGTERM keeps its default.
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self.installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        child = getattr(signal, "SIGCHLD", None)
        if (
            child is not None
            and callable(current := signal.getsignal(child))
            and current is not _ignore_child
        ):
            self._previous.setdefault(child, current)
            signal.signal(child, _ignore_child)

    def agreed(self, accelerator: Any, *, exchange: bool = True) -> bool:
        """True on every rank when any rank was signalled; call on every rank at the same step.

        A single process reads its own flag. Several ranks all-reduce it when `exchange` (the loop
        passes its log steps, where it reads the device anyway) and otherwise go on, so a pre-empted
        run stops at the next log step, the same one on every rank.
        """
        if not self.installed or accelerator.num_processes == 1:
            return self.requested
        if not exchange:
            return False
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def reopen_batches(loaders: Any) -> Iterator[dict]:
    """A fresh training iterator that continues at the loaders' current position.

    Used after the loader's workers died of the stop signal: the position (batches consumed) is
    intact, so the stream continues exactly. The main process's RNG is left as it was (a new
    DataLoader iterator draws a seed from it), so the checkpoint's RNG state is an uninterrupted
    run's.
    """
    loaders.load_state_dict(loaders.state_dict())
    return iter(loaders.train)


def next_batch(batches: Iterator[dict], loaders: Any, stop: StopRequest) -> tuple[dict, Iterator[dict]]:
    """The next training batch and the iterator to continue with (a reopened one after SIGTERM)."""
    try:
        return next(batches), batches
    except StopIteration:
        raise
    except Exception:
        if not stop.requested:
            raise
    with torch.random.fork_rng(devices=[]):
        batches = reopen_batches(loaders)
        return next(batches), batches
