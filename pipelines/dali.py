"""The DALI backend: the project's readers feed encoded bytes to DALI, which decodes and renders two views.

One DALI pipeline per reader (K = data.workers readers per rank, as the torch backend's DataLoader
workers), each fed by a parallel external source whose dedicated Python worker runs
`pipelines.dali_feed`: the same samples, order, skip rule and per-draw parameters as the torch
backend, read through `shard_tools.storage` (a local folder or any store boto3 reaches, one ranged
GET per shard span). DALI decodes (mixed on a GPU) and applies each view's warp, colour matrix and
noise. Batches come out in the torch backend's round robin over readers, so the loader state is the
torch backend's reader position and a resumed run replays exactly. The same graph runs on the CPU
with `device_id=None` (correctness only).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch

from pipelines.augment import LUMA, AugmentSpec
from pipelines.dali_feed import (
    TRAIN_META,
    VAL_META,
    TrainFeed,
    ValFeed,
    epoch_schedule,
    feed_names,
    settle_reader,
)
from pipelines.errors import PipelineError
from pipelines.loaders import LoaderRequest, TrainLoader, ValLoader
from pipelines.mixing import batches_per_epoch, reader_range, worker_quotas
from pipelines.reading import Split
from pipelines.workers import storage_environment
from shard_tools import storage
from shard_tools.format import TRAIN_UNLABELED

pipelines_built = False  # set once this process has built a DALI pipeline (pipelines.workers reads it)
_live_pipelines: weakref.WeakSet = weakref.WeakSet()  # every pipeline built here that still exists
# while this process forks the readers: its pid and whether the main thread forks them
_forking_readers: tuple[int, bool] | None = None


def _reader_after_fork() -> None:
    if _forking_readers is not None:  # a reader DALI just forked (a spawned one settles in its feed)
        settle_reader(*_forking_readers)


os.register_at_fork(after_in_child=_reader_after_fork)


def view_graph(image, spec: AugmentSpec, inputs: dict, view: int, gpu: bool):
    """One view (uint8 CHW) of the decoded HWC `image`, from the feed's parameters for `view`."""
    from nvidia.dali import fn, types

    def on_device(node):
        return node.gpu() if gpu else node

    out_h, out_w = spec.output_size
    # warp_affine has no reflecting border: a reflect_pad view repeats the edge pixels instead
    rendered = fn.warp_affine(image, matrix=inputs[f"matrix{view}"], size=[out_h, out_w], inverse_map=False,
                              fill_value=None if spec.reflect_pad else 0.0, interp_type=types.INTERP_LINEAR)
    if spec.has_colour:
        means = fn.reductions.mean(rendered, axes=[0, 1])
        grey = means[0] * float(LUMA[0]) + means[1] * float(LUMA[1]) + means[2] * float(LUMA[2])
        mixed = fn.coord_transform(rendered, M=inputs[f"colour{view}"], dtype=types.FLOAT)
        rendered = fn.cast(mixed + on_device(inputs[f"offset{view}"]) * grey, dtype=types.UINT8)
    if spec.noise_std:
        noisy = fn.cast(rendered, dtype=types.FLOAT) + on_device(inputs[f"noise{view}"])
        rendered = fn.cast(noisy, dtype=types.UINT8)
    return fn.transpose(rendered, perm=[2, 0, 1])


def feed_pipeline(feed: Callable, specs: Sequence[AugmentSpec], batch_size: int, *, threads: int,
                  device_id: int | None, start_method: str):
    """An unbuilt DALI pipeline over one feed: one uint8 CHW output per spec, then label, key and meta."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    names = feed_names(specs)

    @pipeline_def(batch_size=batch_size, num_threads=max(threads, 1), device_id=device_id, prefetch_queue_depth=2,
                  py_num_workers=1, py_start_method=start_method)
    def graph():
        outputs = fn.external_source(source=feed, num_outputs=len(names), parallel=True, batch=True,
                                     prefetch_queue_depth=2)
        inputs = dict(zip(names, outputs, strict=True))
        image = fn.decoders.image(inputs["jpeg"], device="mixed" if gpu else "cpu", output_type=types.RGB,
                                  adjust_orientation=False)
        views = [view_graph(image, spec, inputs, view, gpu) for view, spec in enumerate(specs)]
        return (*views, inputs["label"], inputs["key"], inputs["meta"])

    return graph()


def start_method() -> str:
    """DALI forks its Python workers until CUDA is initialised here; after that it must spawn them."""
    from nvidia.dali import backend

    return "spawn" if backend.IsDriverInitialized() or torch.cuda.is_initialized() else "fork"


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """While DALI spawns readers: this process's main module hidden from multiprocessing, so a spawned
    reader does not run it again.

    A reader needs `pipelines.dali_feed` only (its feed arrives pickled by reference to that module). A
    spawned child otherwise imports the parent's main module first: under mt-train, torch, timm and
    Accelerate, seconds and hundreds of MB in every reader of every rank.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")  # no __file__, no __spec__: nothing to re-run
    try:
        yield
    finally:
        if main is None:
            del sys.modules["__main__"]
        else:
            sys.modules["__main__"] = main


def reader_parent() -> tuple[int, bool]:
    """This process's pid and whether this is its main thread: what a reader started now settles with."""
    return os.getpid(), threading.current_thread() is threading.main_thread()


def build_pipelines(feeds: Sequence[Callable], specs: Sequence[AugmentSpec], batch_size: int,
                    device_id: int | None, threads: int | None = None) -> list:
    """Built pipelines, one per feed (`threads` DALI threads each, default: the cores shared out); every
    Python worker starts before the first build (DALI's rule for forking them)."""
    global pipelines_built, _forking_readers
    threads = threads or max(1, len(os.sched_getaffinity(0)) // max(len(feeds), 1))
    method = start_method()
    if method == "fork" and _live_pipelines:
        # DALI forks its Python workers safely only while no pipeline runs here: another pipeline's
        # native threads (prefetching, say) may hold a lock at the fork that the child then waits on
        # forever. Pipelines dropped but not yet collected go first; if one still lives (val beside
        # train, two loaders at once), the new workers are spawned.
        gc.collect()
        if len(_live_pipelines):
            method = "spawn"
    pipes = [feed_pipeline(feed, specs, batch_size, threads=threads, device_id=device_id, start_method=method)
             for feed in feeds]
    pipelines_built = True  # DALI's native threads live here now: no plain fork (pipelines.workers)
    _live_pipelines.update(pipes)
    try:
        _forking_readers = reader_parent()
        try:
            with main_module_hidden() if method == "spawn" else contextlib.nullcontext():
                for pipe in pipes:
                    pipe.start_py_workers()
        finally:
            _forking_readers = None
        for pipe in pipes:
            pipe.build()
    except RuntimeError as exc:
        close_pipelines(pipes)
        raise PipelineError(f"DALI could not build its pipelines: {_first_line(str(exc))}; use data.backend=torch "
                            "or check the DALI install") from None
    return pipes


def close_pipelines(pipes: Sequence) -> None:
    """End each pipeline's Python workers now (a pipeline dropped later would end them when collected)."""
    for pipe in pipes:
        pool = getattr(pipe, "_py_pool", None)
        if pool is not None:
            pool.close()


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no message"


_FEED_ERROR = re.compile(r"PipelineError: (.+)$", re.MULTILINE)


def error_line(exc: BaseException, what: str) -> str:
    """One line for a failed pipeline run: a reader's own PipelineError (from its worker) as it was raised,
    else what DALI says it encountered (an image that passed the readers' check but does not decode)."""
    text = str(exc)
    found = _FEED_ERROR.findall(text)
    if found:
        return found[-1].strip()
    reason = _first_line(text.split("encountered:", 1)[1]) if "encountered:" in text else _first_line(text)
    return (f"DALI failed on a batch of {what}: {reason}; find the image with `mt-shard verify --decode` and "
            "re-pack its shard, or use data.backend=torch, which skips undecodable images")


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """Copy one DALI output into a new torch tensor: GPU outputs onto `device`, CPU ones on the CPU."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    if not isinstance(tensor_list, TensorListGPU):
        device = torch.device("cpu")
    dali_tensor = tensor_list.as_tensor()
    out = torch.empty(dali_tensor.shape(), dtype=to_torch_type[dali_tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dali_tensor, out, cuda_stream=stream)
    return out


def _keys(tensor_list) -> list[str]:
    return [bytes(tensor_list.at(i)).decode() for i in range(len(tensor_list))]


class DaliReaders:
    """The pipelines of one stream (train or val), rebuilt whenever asked for other batches than they hold next."""

    def __init__(self, make_feeds: Callable[[object], list[Callable | None]], specs: Sequence[AugmentSpec],
                 batch_size: int, device_id: int | None, what: str) -> None:
        self.make_feeds, self.specs, self.batch_size, self.what = make_feeds, specs, batch_size, what
        self.device_id = device_id
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        self.pipes: list | None = None
        self.position: object = None  # what the pipelines deliver next; None = unknown (rebuild)

    def open(self, position: object) -> None:
        if self.pipes is not None and self.position == position:
            return
        self.close()
        feeds = self.make_feeds(position)
        built = build_pipelines([f for f in feeds if f is not None], self.specs, self.batch_size, self.device_id)
        iterator = iter(built)
        self.pipes = [next(iterator) if f is not None else None for f in feeds]
        self.position = position

    def run(self, reader: int) -> list:
        """The next batch of `reader`: its DALI outputs (views, label, key, meta), one line on failure."""
        try:
            return list(self.pipes[reader].run())
        except Exception as exc:  # DALI raises plain Exception/RuntimeError with the worker's traceback
            self.close()
            raise PipelineError(error_line(exc, self.what)) from None

    def close(self) -> None:
        if self.pipes is not None:
            close_pipelines([p for p in self.pipes if p is not None])
        self.pipes, self.position = None, None

    def tensors(self, outputs: list) -> tuple[list[torch.Tensor], torch.Tensor, list[str], list[int]]:
        views = [_to_torch(o, self.device) for o in outputs[:len(self.specs)]]
        label, key, meta = outputs[len(self.specs):]
        return views, _to_torch(label, self.device).reshape(-1), _keys(key), [int(v) for v in meta.at(0)]


def _train_readers(request: LoaderRequest, device_id: int | None) -> tuple[DaliReaders, TrainLoader]:
    cfg, workers = request.cfg, max(request.cfg.workers, 1)
    rows = cfg.labeled_per_batch + cfg.unlabeled_per_batch
    split, per_batch = ((request.unlabeled, cfg.unlabeled_per_batch) if cfg.unlabeled_per_batch
                        else (request.labeled, cfg.labeled_per_batch))
    quotas = tuple(worker_quotas(split.total, request.rank, request.world_size, workers, per_batch))
    length = batches_per_epoch(split.total, request.world_size, workers, per_batch)
    environment = storage_environment(request)

    def make_feeds(position) -> list[TrainFeed | None]:
        epoch, starts = position
        feeds = [TrainFeed(request.labeled, request.unlabeled, (request.student, request.teacher),
                           cfg.labeled_per_batch, cfg.unlabeled_per_batch, cfg.seed, cfg.shuffle_buffer, request.rank,
                           request.world_size, workers, k, quotas, length, epoch, starts, environment,
                           reader_parent(), cfg.max_pixels)
                 for k in range(workers)]
        return [f if f.scheduled([s[0] for s in starts]) or f.scheduled([0] * workers) else None for f in feeds]

    readers = DaliReaders(make_feeds, (request.student, request.teacher), rows, device_id, "the training splits")

    def open_epoch(epoch: int, starts: list[list[int]]) -> Iterator[dict]:
        begin = tuple(tuple(int(v) for v in start) for start in starts)
        schedule = epoch_schedule(quotas, [start[0] for start in begin], length)
        readers.open((epoch, begin))
        readers.position = None  # until this epoch has been read to its end
        for number, (worker, index) in enumerate(schedule):
            (student, teacher), label, keys, meta = readers.tensors(readers.run(worker))
            info = dict(zip(TRAIN_META, meta, strict=True))
            if (info["epoch"], info["worker"], info["index"]) != (epoch, worker, index):
                raise PipelineError(f"DALI reader {worker} delivered batch {info['index']} of epoch {info['epoch']} "
                                    f"for batch {index} of epoch {epoch}; report this")
            if number == len(schedule) - 1:
                readers.position = (epoch + 1, tuple((0, 0, 0) for _ in range(workers)))
            batch = {"student": student, "teacher": teacher, "label": label, "_worker": worker, "_index": index,
                     "_skipped": info["skipped"],
                     "_positions": [info["labeled_position"], info["unlabeled_position"]]}
            if request.with_keys:
                batch["key"] = keys
            yield batch

    train = TrainLoader(open_epoch, lambda epoch: list(quotas), length, request.world_size, workers,
                        (cfg.labeled_per_batch, cfg.unlabeled_per_batch))
    return readers, train


def _val_loader(request: LoaderRequest, device_id: int | None) -> tuple[DaliReaders, ValLoader]:
    cfg, workers, val = request.cfg, max(request.cfg.workers, 1), request.val
    size = cfg.eval_batch_size
    environment = storage_environment(request)
    shares = [reader_range(val.total, request.rank, request.world_size, k, workers) for k in range(workers)]
    readers = DaliReaders(lambda _: [ValFeed(val, request.eval_spec, size, share, environment, reader_parent(),
                                             cfg.max_pixels)
                                     if len(share) else None for share in shares],
                          (request.eval_spec,), size, device_id, val.name)

    def val_pass() -> Iterator[dict]:
        readers.open("pass")
        readers.position = None  # until every reader has delivered its last batch
        active = [k for k, share in enumerate(shares) if len(share)]
        while active:
            for worker in list(active):
                (image,), label, keys, meta = readers.tensors(readers.run(worker))
                info = dict(zip(VAL_META, meta, strict=True))
                if info["last"]:
                    active.remove(worker)
                    if not active:
                        readers.position = "pass"
                valid = torch.arange(size) < info["valid_rows"]
                image[~valid.to(image.device)] = 0
                batch = {"image": image, "label": label, "valid": valid, "_skipped": info["skipped"]}
                if request.with_keys:
                    batch["key"] = keys[:info["valid_rows"]]
                yield batch

    batches = max(sum(math.ceil(len(reader_range(val.total, r, request.world_size, k, workers)) / size)
                      for k in range(workers)) for r in range(request.world_size))

    def empty_val() -> dict:
        return {"image": torch.zeros((size, 3, *request.eval_spec.output_size), dtype=torch.uint8,
                                     device=readers.device),
                "label": torch.full((size,), -1, dtype=torch.int64), "valid": torch.zeros(size, dtype=torch.bool)}

    return readers, ValLoader(val_pass, batches, empty_val)


def build_dali_loaders(request: LoaderRequest) -> tuple[TrainLoader, ValLoader]:
    """The DALI backend behind pipelines.loaders' contract; device_id None = CPU-only graph (or the current
    CUDA device when one is present). Pipelines are built on first use and rebuilt on a jump (resume)."""
    device_id = request.device_id
    if device_id is None and torch.cuda.is_available():
        device_id = torch.cuda.current_device()
    _, train = _train_readers(request, device_id)
    _, val = _val_loader(request, device_id)
    return train, val


def build_pipeline(shards: list[str], specs: tuple[AugmentSpec, ...], batch_size: int, *, shard_id: int,
                   num_shards: int, shuffle_buffer: int, seed: int, threads: int, device_id: int | None):
    """A built pipeline over `shards` (part `shard_id` of `num_shards`, supervised rows) whose first outputs
    are one uint8 CHW view per spec; for checks that look at the views alone."""
    counts = [_count(shard) for shard in shards]
    split = Split(TRAIN_UNLABELED, tuple(shards), tuple(counts), 0)  # labels as stored, unchecked
    total = sum(counts)
    # an "epoch" of at least one batch: the draws cycle over the part however few samples it holds
    batches = max(1, math.ceil(len(reader_range(total, shard_id, num_shards)) / batch_size))
    feed = TrainFeed(split, split, tuple(specs), batch_size, 0, seed, shuffle_buffer, shard_id, num_shards, 1, 0,
                     (batches,), batches, 0, ((0, 0, 0),),
                     storage.environment(shards[0]))
    return build_pipelines([feed], specs, batch_size, device_id, threads)[0]


def _count(shard: str) -> int:
    from shard_tools.format import index_name, parse_index

    return len(parse_index(storage.read_bytes(index_name(shard)).decode(), index_name(shard)))
