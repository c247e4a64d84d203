"""Where the torch backend's DataLoader workers start (fork or a forkserver) and how each sets itself up.

A forkserver worker must not re-run the main module: CPython before 3.13.8 silently drops "__main__"
from the forkserver's preload list (python/cpython#126631), so each worker of each epoch re-ran the
main script, and under the mt-train or mt-bench console scripts that re-imported mt_scale, timm and
more (seconds per worker): forkserver workers measured half the speed of forked ones. This module,
preloaded in the forkserver, runs the parent's main there once instead, as the fixed CPython does.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
from multiprocessing import process, spawn

import cv2
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.loaders import LoaderRequest
from shard_tools import storage

# the parent's main module and sys.path, handed to the forkserver it starts (see _start_forkserver)
_PARENT_MAIN = "MT_SCALE_FORKSERVER_PARENT_MAIN"
_MAIN_KEYS = ("sys_path", "sys_argv", "init_main_from_name", "init_main_from_path")


def storage_environment(request: LoaderRequest) -> dict[str, str] | None:
    """The AWS settings the workers need when the set is in object storage (None for a local set)."""
    urls = [split.shards[0] for split in (request.labeled, request.unlabeled, request.val) if split.shards]
    return storage.environment(urls[0]) if urls else None


def worker_start(storage_environment: dict[str, str] | None) -> int:
    """Set up a worker (or the main process when workers=0); its worker number."""
    info = get_worker_info()
    cv2.setNumThreads(1)  # each worker is one core's worth of parallelism
    if info is not None:
        # a forked worker inherits the trainer's SIGTERM handler (a stop flag): restore the default so a
        # pre-empted worker ends, as a forkserver one does, and the trainer reopens the loader at its position
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # a forkserver started before the AWS settings were (a notebook, a test) passed on stale ones
        storage.apply_environment(storage_environment)
    return info.id if info is not None else 0


def fork_is_safe() -> bool:
    """Plain fork, the fastest worker start, is safe until DALI or CUDA runs here."""
    dali = sys.modules.get("pipelines.dali")
    return (
        "fork" in multiprocessing.get_all_start_methods()
        and not getattr(dali, "pipelines_built", False)
        and not torch.cuda.is_initialized()
        # mt-train's pre-emption handling (mt_scale.preemption) is tested with forkserver workers, and a
        # worker forked with the trainer's handler keeps it until worker_start resets it
        and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)
    )


def worker_context() -> multiprocessing.context.BaseContext:
    """Where DataLoader workers start: plain fork while that is safe, else a forkserver (started here).

    Forking the training process is unsafe once DALI (or CUDA) has run in it: its native threads are
    not copied and the children can crash. Then workers start from a forkserver that has run the main
    module and imported this package once, so a worker starts in milliseconds and renders as fast as a
    forked one (as with spawn, a script that builds loaders then needs the `if __name__ == "__main__":`
    guard).
    """
    if fork_is_safe():
        return multiprocessing.get_context("fork")
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__, "pipelines.torch_loader"])
    _start_forkserver()
    return context


def _start_forkserver() -> None:
    """Start the forkserver (a no-op while it runs) with the parent's main for _run_parent_main."""
    data = spawn.get_preparation_data("ignore")
    setting = json.dumps({"parent": os.getpid(), **{key: data[key] for key in _MAIN_KEYS if key in data}})
    if len(setting) >= 65536:  # Linux's limit on one variable: each worker then runs the main itself
        setting = json.dumps({"parent": os.getpid()})
    os.environ[_PARENT_MAIN] = setting
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.pop(_PARENT_MAIN, None)


def _run_parent_main(setting: str) -> None:
    """In the forkserver: what every worker would do first (sys.path, argv, main module), done once, and
    SIGTERM ignored.

    The workers then find the main module in place and skip it (multiprocessing.spawn.prepare). If
    the main module fails here, each worker runs it again and reports the failure as before.
    """
    data = json.loads(setting)
    if data.pop("parent") != os.getppid():
        return  # not the forkserver of the process that set it
    # SIGTERM reaches the whole process group: the trainer handles it (a checkpoint at the next step) and
    # reopens a loader whose workers it ended, from this forkserver, which must still be there. It ends
    # with the trainer (end-of-file on its pipe); each worker restores the default (worker_start).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    process.current_process()._inheriting = True  # a main without the guard fails instead of recursing
    try:
        spawn.prepare(data)
    except BaseException:  # each worker then runs the main module itself and reports what it raises
        pass
    finally:
        del process.current_process()._inheriting


def make_dataloader(dataset: IterableDataset, workers: int) -> DataLoader:
    """A DataLoader whose workers yield finished batches (batch_size=None), started per epoch."""
    context = worker_context() if workers else None
    if context is not None and context.get_start_method() == "fork":
        # a child forked from a process whose OpenCV thread pool exists hangs in its first
        # cv2.setNumThreads: one thread here (the main process does no image work) before forking
        cv2.setNumThreads(1)
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=2 if workers else None, persistent_workers=False,
                      multiprocessing_context=context)


if _PARENT_MAIN in os.environ:  # imported as a preload by the forkserver that _start_forkserver started
    _run_parent_main(os.environ.pop(_PARENT_MAIN))
