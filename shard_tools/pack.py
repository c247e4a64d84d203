"""`mt-shard pack`: turn an image collection into a shard set, in parallel and resumably.

Stages: find the images (sources) -> check every image (parallel) -> choose val, labels and the
global order (split) -> plan the shards -> write the shards (parallel; each shard is one task whose
bytes depend only on its plan, so the worker count never changes the output) -> labels files and
manifest. A killed pack resumes: finished shards whose plan and sha256 still match are kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import numbers
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from shard_tools import storage
from shard_tools.errors import os_error_message
from shard_tools.files import check_output_location, make_dirs, sha256_file
from shard_tools.format import SPLITS, ShardFormatError
from shard_tools.imaging import DEFAULT_MAX_PIXELS, BadImage, encode_for_shard, inspect, read_bytes
from shard_tools.locks import folder_lock
from shard_tools.manifest import Manifest, read_manifest
from shard_tools.pack_resume import STATE_NAME, abandon, finished_shards, journal_shard, out_state, save_state
from shard_tools.plan import PackPlan, ShardTask, make_plan, write_set_files
from shard_tools.sources import DIGITS, load_source
from shard_tools.split import read_labels_file
from shard_tools.writer import ShardResult, sample_members, write_shard


@dataclass
class PackSummary:
    """What a pack (or re-split) made, and the one line `mt-shard` prints about it."""

    out_dir: Path
    counts: dict[str, int]
    skipped: int
    bytes: int
    seconds: float
    shards_written: int
    shards_kept: int = 0
    already_complete: bool = False
    skipped_paths: list[str] = field(default_factory=list)
    verb: str = "packed"
    note: str = ""  # anything else the user should know, appended to the line

    @classmethod
    def of_set(cls, out_dir: Path, manifest: Manifest, seconds: float, shards_written: int = 0,
               **fields) -> PackSummary:
        """The summary of the set `manifest` describes (images per split, skipped, bytes), with `fields`."""
        counts = {name: manifest.split(name).num_samples for name in SPLITS}
        size = sum(sum(manifest.split(name).bytes) for name in SPLITS)
        return cls(out_dir, counts, len(manifest.skipped), size, seconds, shards_written, **fields)

    @property
    def images(self) -> int:
        return sum(self.counts.values())

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.already_complete:
            return f"{self.out_dir}: already packed with these options ({self.images} images); nothing to do"
        per_split = ", ".join(f"{name} {self.counts.get(name, 0)}" for name in SPLITS)
        kept = f", {self.shards_kept} finished shards kept" if self.shards_kept else ""
        return (
            f"{self.verb} {self.images} images ({per_split}), skipped {self.skipped}, "
            f"{self.bytes / 1e6:.1f} MB in {self.shards_written + self.shards_kept} shards{kept}, "
            f"{self.seconds:.1f} s ({self.images_per_second:.0f} img/s) -> {self.out_dir}"
            + (f" ({self.note})" if self.note else "")
        )


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_seed(seed: int) -> None:
    """Seeds are whole numbers >= 0 (numpy's generators refuse negative ones)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ShardFormatError(f"--seed {seed}: must be a whole number, 0 or more")


def _check_options(quality: int, shard_size: int, shard_bytes: int | None, workers: int, max_side: int | None,
                   labels_per_class, label_fraction, labels_file, seed: int, max_pixels: int | None) -> None:
    if sum(x is not None for x in (labels_per_class, label_fraction, labels_file)) > 1:
        raise ShardFormatError("give one of --labels-per-class, --label-fraction and --labels, not several")
    check_seed(seed)
    if max_pixels is not None and max_pixels < 1:
        raise ShardFormatError(f"--max-pixels {max_pixels}: must be at least 1")
    if not 1 <= quality <= 100:
        raise ShardFormatError(f"--quality {quality}: must be 1..100")
    if shard_size < 1 or (shard_bytes is not None and shard_bytes < 1):
        raise ShardFormatError("--shard-size and --shard-bytes must be at least 1")
    if workers < 1:
        raise ShardFormatError(f"--workers {workers}: must be at least 1")
    if max_side is not None and max_side < 1:
        raise ShardFormatError(f"--max-side {max_side}: must be at least 1 pixel")


def _worker_init() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe
    if sys.platform.startswith("linux"):
        # Die with the parent: a killed pack must not leave workers writing into OUT while it resumes.
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass


@contextlib.contextmanager
def _one_thread_per_worker():
    """Packing in this process counts as one worker: keep OpenCV to one thread meanwhile."""
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def _pool(workers: int):
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_worker_init)


def _parallel_map(function: Callable, tasks: list, workers: int, ordered: bool, chunksize: int = 1) -> Iterable:
    if workers <= 1 or len(tasks) <= 1:
        yield from map(function, tasks)
        return
    with _pool(min(workers, len(tasks))) as pool:
        mapper = pool.imap if ordered else pool.imap_unordered
        yield from mapper(function, tasks, chunksize)


def _scan_one(item: tuple[str | None, bytes | None, int]) -> tuple[str | None, int, int, bool, int]:
    """(reason it is bad or None, width, height, keepable JPEG, file bytes)."""
    try:
        raw = read_bytes(item[0], item[1], item[2])
        width, height, keep = inspect(raw, item[2])
        return None, width, height, keep, len(raw)
    except BadImage as exc:
        return str(exc), 0, 0, False, 0


def _pack_shard(task: ShardTask) -> tuple[ShardResult, list[dict]]:
    """Write one shard; it is in OUT's resume journal before it takes its final name."""
    skipped: list[dict] = []

    def samples():
        for entry in task.samples:
            try:
                jpeg = encode_for_shard(read_bytes(entry.path, entry.data, task.max_pixels), task.max_side, task.quality,
                                        task.max_pixels)
            except BadImage as exc:
                skipped.append({"path": entry.origin, "reason": str(exc), "key": entry.key})
                continue
            yield sample_members(entry.key, jpeg, entry.written_label, {"source": entry.origin, "size": entry.size})

    def journal(result: ShardResult) -> None:
        journal_shard(Path(task.out_dir), task.name, shard_record(task, result, skipped))

    return write_shard(task.out_dir, task.name, samples(), before_publish=journal), skipped


def shard_record(task: ShardTask, result: ShardResult, skipped: list[dict]) -> dict:
    """What the resume journal and the manifest keep of a finished shard."""
    return {"plan": task.plan_hash, "sha256": result.sha256, "count": result.count, "bytes": result.bytes,
            "skipped": skipped}


def _check_input_files(labels_file: str | Path | None, val_labels: str | Path | None,
                       classes_file: str | Path | None) -> None:
    if labels_file is not None and not Path(labels_file).is_file():
        raise ShardFormatError(f"{labels_file}: no such labels file; check --labels")
    if val_labels is not None and not Path(val_labels).is_file():
        raise ShardFormatError(f"{val_labels}: no such val labels file; check --val-labels")
    if classes_file is not None and not Path(classes_file).is_file():
        raise ShardFormatError(f"{classes_file}: no such classes file; check --classes")


def _out_state_of(out: Path, source: str | Path, pack_args: dict) -> str:
    """'new', 'resume' or 'complete' for OUT (see pack_resume.out_state); refuses an OUT inside SRC."""
    if str(source) != DIGITS and Path(source).is_dir() and out.resolve().is_relative_to(Path(source).resolve()):
        raise ShardFormatError(f"{out}: is inside SRC {source}, so a later pack would read its shards; put OUT elsewhere")
    try:
        return out_state(out, pack_args)
    except OSError as exc:
        raise ShardFormatError(f"{os_error_message(exc, out)}; choose another OUT") from None


def _make_plan(source: str | Path, out: Path, pack_args: dict, pixel_cap: int, workers: int, progress: bool, *,
               labels_file: str | Path | None, classes_file: str | Path | None, val_list: str | Path | None,
               val_labels: str | Path | None) -> PackPlan:
    """Find the images, check every one (in parallel) and plan the shards: nothing is written yet."""
    collection = load_source(source, str(classes_file) if classes_file else None, str(val_list) if val_list else None,
                             str(val_labels) if val_labels else None, progress)
    if labels_file is not None:
        read_labels_file(labels_file, collection.classes)  # its errors show before the long check
    items = collection.train + (collection.val or [])
    scans = list(
        tqdm(
            _parallel_map(_scan_one, [(item.path, item.data, pixel_cap) for item in items], workers, True, chunksize=32),
            total=len(items), desc="check", unit="img", disable=not progress, leave=False,
        )
    )
    plan: PackPlan = make_plan(collection, scans, pack_args, labels_file=labels_file, out_dir=out)
    for task in plan.tasks:
        task.max_pixels = pixel_cap
    return plan


_LOCK_WHO = "another mt-shard pack or resplit"
_LOCK_FIX = "wait for it to finish, or choose another OUT"


def _lock_new_out(out: Path, held: contextlib.ExitStack, pack_args: dict, state: str) -> None:
    """Lock an OUT this run has just made, for the rest of the pack; refuse it when another pack wrote
    it while this one was planning."""
    held.enter_context(folder_lock(out, who=_LOCK_WHO, fix=_LOCK_FIX))
    if out_state(out, pack_args) != state:
        raise ShardFormatError(f"{out}: another pack wrote this folder while this one was planning; "
                               "run the command again")


def _write_set(out: Path, plan: PackPlan, pack_args: dict, state: str, workers: int,
               progress: bool, held: contextlib.ExitStack, locked: bool) -> tuple[Manifest, int]:
    """Write the shards not finished yet (in parallel; each worker journals its shards), then the set files.

    Returns the manifest and the count of shards written by this run.
    """
    created: list[Path] = []
    records: dict[str, dict] = {}
    try:
        created = make_dirs(out)
        if not locked:
            _lock_new_out(out, held, pack_args, state)
        records = finished_shards(out, plan, resuming=state == "resume")
        save_state(out, pack_args, records)
        # Largest shards first, so the last ones to finish are small and workers end together.
        todo = sorted((t for t in plan.tasks if t.name not in records), key=lambda t: -len(t.samples))
        tasks = {t.name: t for t in todo}
        bar = tqdm(total=sum(len(t.samples) for t in todo), desc="pack", unit="img", disable=not progress)
        with _one_thread_per_worker():
            for result, skipped in _parallel_map(_pack_shard, todo, workers, ordered=False):
                records[result.name] = shard_record(tasks[result.name], result, skipped)
                bar.update(result.count + len(skipped))
        bar.close()
        manifest = write_set_files(out, plan, records)
        (out / STATE_NAME).unlink(missing_ok=True)
    except OSError as exc:
        raise abandon(out, created, records, exc) from None
    return manifest, len(todo)


def pack(
    source: str | Path,
    out_dir: str | Path,
    *,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    labels_file: str | Path | None = None,
    seed: int = 0,
    val_fraction: float | None = None,
    max_side: int | None = None,
    quality: int = 90,
    shard_size: int = 1000,
    shard_bytes: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    classes_file: str | Path | None = None,
    val_list: str | Path | None = None,
    val_labels: str | Path | None = None,
    max_pixels: int | None = None,
) -> PackSummary:
    """Pack `source` (an image tree, a list file, an archive or "digits") into the shard set `out_dir`.

    `val_list` is the val source (`--val`), `val_labels` the classes of a flat val archive or folder.
    `max_pixels` caps width x height of an input image (default: PIL's own cap, DEFAULT_MAX_PIXELS);
    a larger one is skipped from its header, never decoded.
    """
    if "://" in storage.check_location(out_dir):  # Path() would turn s3://b/set into a local folder s3:/b/set
        raise ShardFormatError(f"{out_dir}: pack writes a local folder; for object storage use "
                               "shard_tools.pack_s3.pack_to_s3 (what `mt-shard pack SRC s3://...` runs)")
    started = time.perf_counter()
    workers = default_workers() if workers is None else int(workers)
    _check_options(quality, shard_size, shard_bytes, workers, max_side, labels_per_class, label_fraction, labels_file,
                   seed, max_pixels)
    out = Path(out_dir)
    _check_input_files(labels_file, val_labels, classes_file)
    # Everything that decides the output (not the worker count): a resume must match it exactly.
    pack_args = {
        "source": DIGITS if str(source) == DIGITS else str(Path(source).resolve()),
        "labels_per_class": labels_per_class,
        "label_fraction": label_fraction,
        "labels_file_sha256": sha256_file(labels_file) if labels_file else None,
        "seed": int(seed),
        "val_fraction": val_fraction,
        "max_side": max_side,
        "quality": int(quality),
        "shard_size": int(shard_size),
        "shard_bytes": shard_bytes,
        "classes_file_sha256": sha256_file(classes_file) if classes_file else None,
        "val_list": str(Path(val_list).resolve()) if val_list else None,
        # only when given, so sets packed before --val-labels existed still match their command
        **({"val_labels_sha256": sha256_file(val_labels)} if val_labels else {}),
    }
    if max_pixels is not None:  # recorded only when given, so sets packed before the option still match
        pack_args["max_pixels"] = int(max_pixels)
    pixel_cap = int(max_pixels) if max_pixels is not None else DEFAULT_MAX_PIXELS
    with contextlib.ExitStack() as held:  # OUT's lock, once taken, until the pack ends
        locked = out.is_dir()
        if locked:  # a second writer is refused before the long check
            held.enter_context(folder_lock(out, who=_LOCK_WHO, fix=_LOCK_FIX))
        state = _out_state_of(out, source, pack_args)
        if state == "complete":
            return PackSummary.of_set(out, read_manifest(out), 0.0, already_complete=True)
        check_output_location(out, "OUT")  # before the long check: a wrong OUT fails in a second

        plan = _make_plan(source, out, pack_args, pixel_cap, workers, progress, labels_file=labels_file,
                          classes_file=classes_file, val_list=val_list, val_labels=val_labels)
        # Everything a user can get wrong has been checked: from here on files are written.
        manifest, written = _write_set(out, plan, pack_args, state, workers, progress, held, locked)
    return PackSummary.of_set(out, manifest, time.perf_counter() - started, shards_written=written,
                              shards_kept=len(plan.tasks) - written,
                              skipped_paths=[entry["path"] for entry in manifest.skipped])
