"""`mt-shard resplit`: a new label split of an existing set, made by copying tar members.

No image is decoded or re-encoded: the `.jpg` and `.json` members are copied byte for byte (found
through the DALI indexes), the `.cls`/`.lbl` members are rewritten, val shards are copied whole.
The training keys, their order rules and the shuffle are pack's, so re-splitting a set gives the
same training shards as packing the source again with the new split (same seed and shard size).

The source is distrusted: every shard's size and sha256 must match its manifest before anything is
copied, and member locations come from the checked tars themselves, not from their `.idx` files.
NEWOUT is built under a hidden temporary sibling (`.NEWOUT.partial`) and renamed when complete, so
a failed or interrupted re-split leaves no NEWOUT; the next run discards the temporary and starts over.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

from tqdm import tqdm

from shard_tools.bounded import load_json
from shard_tools.errors import os_error_message
from shard_tools.files import (
    check_output_location,
    make_dirs,
    partial_path,
    remove_empty_dirs,
    sha256_file,
)
from shard_tools.format import (
    CLASS_EXT,
    IMAGE_EXT,
    LABEL_EXT,
    META_EXT,
    NO_LABEL,
    SPLITS,
    TRAIN_CLASSES_NAME,
    TRAIN_LABELED,
    TRAIN_UNLABELED,
    VAL,
    ShardFormatError,
    build_index,
    encode_class,
    encode_label,
    index_name,
    parse_index,
    shard_name,
)
from shard_tools.locks import folder_lock
from shard_tools.manifest import Manifest, parse_key_classes, read_manifest
from shard_tools.pack import PackSummary, check_seed
from shard_tools.plan import (
    SPLIT_CODE,
    PackPlan,
    ShardTask,
    cut_into_shards,
    sample_tar_bytes,
    write_set_files,
)
from shard_tools.split import choose_labeled, match_labels_file, read_labels_file, shuffled
from shard_tools.writer import write_shard

MARKER_NAME = ".mt-shard-resplit"  # inside the temporary folder: says it is ours to discard
_MAX_META_BYTES = 1 << 20
_TAR_ERRORS = (tarfile.TarError, EOFError)


def _damaged(source: Path, what: str) -> ShardFormatError:
    return ShardFormatError(f"{what}; the set is damaged: run mt-shard verify {source} (nothing was written)")


def _check_source_shards(source: Path, manifest: Manifest) -> None:
    """Every shard present with the size and sha256 its manifest gives, before anything is copied."""
    shards = [(name, manifest.split(split), position) for split in SPLITS
              for position, name in enumerate(manifest.split(split).shards)]
    for name, info, position in shards:  # the cheap checks first
        path = source / name
        if not path.is_file():
            raise _damaged(source, f"{path}: missing")
        if info.bytes and path.stat().st_size != info.bytes[position]:
            raise _damaged(source, f"{path}: {path.stat().st_size} bytes, the manifest says {info.bytes[position]}")
    for name, info, position in shards:
        if sha256_file(source / name) != info.sha256[position]:
            raise _damaged(source, f"{source / name}: sha256 differs from the manifest")


def _locations(source: Path, shards: list[str]) -> dict[str, tuple[Path, dict[str, tuple[int, int]]]]:
    """Where each training sample's members lie, read from the (checked) tars themselves."""
    found = {}
    for name in shards:
        path = source / name
        try:
            samples = parse_index(build_index(path), str(path))
        except _TAR_ERRORS as exc:
            raise _damaged(source, f"{path}: unreadable tar ({exc})") from None
        for key, components in samples:
            if key in found or IMAGE_EXT not in components:
                raise _damaged(source, f"{path}: sample {key} repeats or has no .{IMAGE_EXT}")
            found[key] = (path, components)
    return found


_OPEN_SHARDS = 64  # samples are read in shuffled order: keep a few shards open, never one per shard (EMFILE)


def _read_member(handles: dict, tar_path: Path, place: tuple[int, int]) -> bytes:
    handle = handles.get(tar_path)
    if handle is None:
        if len(handles) >= _OPEN_SHARDS:
            handles.pop(next(iter(handles))).close()
        handle = handles[tar_path] = open(tar_path, "rb")  # noqa: SIM115 - closed in resplit's finally
    handle.seek(place[0])
    return handle.read(place[1])


def _origin(handles: dict, key: str, place: tuple[Path, dict]) -> str:
    """The source path a sample's `.json` member names (labels files may use it), else its key."""
    meta = place[1].get(META_EXT)
    if meta is None or meta[1] > _MAX_META_BYTES:
        return key
    try:
        source = load_json(_read_member(handles, place[0], meta), key, ShardFormatError, fix="").get("source")
    except (ShardFormatError, AttributeError):
        return key
    return source if isinstance(source, str) else key


def _copy_shard(source: Path, folder: Path, name: str, sha256: str) -> int:
    """Copy one val shard (temporary name, checked, renamed) and write its index; returns its size."""
    target = folder / name
    temp = partial_path(target)
    shutil.copyfile(source / name, temp)
    if sha256_file(temp) != sha256:  # the source changed since it was checked
        raise _damaged(source, f"{source / name}: sha256 differs from the manifest")
    index = folder / index_name(name)
    try:
        text = build_index(temp)
        parse_index(text, str(source / name))  # its member names are keys, never paths
    except _TAR_ERRORS as exc:
        raise _damaged(source, f"{source / name}: unreadable tar ({exc})") from None
    partial_path(index).write_text(text)
    os.replace(partial_path(index), index)
    os.replace(temp, target)
    return target.stat().st_size


def _check_target(source: Path, target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ShardFormatError(f"{target}: is a file, not a folder; choose another NEWOUT (a new or empty folder)")
    if target.exists() and any(target.iterdir()):
        raise ShardFormatError(f"{target}: exists and is not empty; choose another NEWOUT or delete it")
    if target.resolve().is_relative_to(source.resolve()):
        raise ShardFormatError(f"{target}: is inside the shard set {source}; put NEWOUT elsewhere")
    check_output_location(target, "NEWOUT")


_LOCK_WHO = "another mt-shard resplit"
_LOCK_FIX = "wait for it to finish, or choose another NEWOUT"


def _discard_leftover(temp: Path) -> str:
    """Remove the temporary folder an interrupted earlier re-split left; refuse one that is not ours."""
    if not temp.exists() and not temp.is_symlink():
        return ""
    if temp.is_symlink() or not temp.is_dir():
        raise ShardFormatError(f"{temp}: exists and was not left by mt-shard resplit; move or delete it, then rerun")
    with folder_lock(temp, who=_LOCK_WHO, fix=_LOCK_FIX):  # refuses a re-split still writing it
        if not (temp / MARKER_NAME).is_file():
            raise ShardFormatError(f"{temp}: exists and was not left by mt-shard resplit; move or delete it, "
                                   "then rerun")
        shutil.rmtree(temp)
    return f"discarded the unfinished re-split an earlier run left in {temp}"


def _label_choice(keys, labels, origins, manifest: Manifest, labels_per_class, label_fraction, labels_file, seed):
    if labels_file is not None:
        entries = read_labels_file(labels_file, manifest.classes)
        return match_labels_file(entries, keys, origins(), labels), {"method": "file",
                                                                      "file": str(Path(labels_file).resolve())}
    chosen = choose_labeled(labels, manifest.num_classes, labels_per_class=labels_per_class,
                            label_fraction=label_fraction, seed=seed, class_names=manifest.classes)
    if labels_per_class is not None:
        return chosen, {"method": "labels_per_class", "labels_per_class": labels_per_class}
    if label_fraction is not None:
        return chosen, {"method": "fraction", "fraction": label_fraction}
    return chosen, {"method": "all"}


def _shard_limits(manifest: Manifest, shard_size: int | None) -> tuple[int, int | None]:
    if shard_size is not None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ShardFormatError(f"--shard-size {shard_size}: must be at least 1")
        size = shard_size
    else:
        size = manifest.pack_args.get("shard_size", 1000)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ShardFormatError(f"manifest.json: pack_args.shard_size is {size!r}; give --shard-size")
    shard_bytes = manifest.pack_args.get("shard_bytes")
    if shard_bytes is not None and (isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes < 1):
        raise ShardFormatError(f"manifest.json: pack_args.shard_bytes is {shard_bytes!r}, not a byte count; re-pack")
    return size, shard_bytes


def resplit(
    shard_dir: str | Path,
    new_dir: str | Path,
    *,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    labels_file: str | Path | None = None,
    seed: int = 0,
    shard_size: int | None = None,
    progress: bool = True,
) -> PackSummary:
    """Write `new_dir`: the set in `shard_dir` with a new labeled/unlabeled split of its training images."""
    started = time.perf_counter()
    source, target = Path(shard_dir), Path(new_dir)
    if sum(x is not None for x in (labels_per_class, label_fraction, labels_file)) > 1:
        raise ShardFormatError("give one of --labels-per-class, --label-fraction and --labels, not several")
    check_seed(seed)
    if labels_file is not None and not Path(labels_file).is_file():
        raise ShardFormatError(f"{labels_file}: no such labels file; check --labels")
    manifest = read_manifest(source)
    size, shard_bytes = _shard_limits(manifest, shard_size)
    _check_target(source, target)
    truth_path = source / TRAIN_CLASSES_NAME
    if not truth_path.is_file():
        raise ShardFormatError(f"{truth_path}: missing, so the unlabeled images' classes are unknown; re-pack")
    truth, problems = parse_key_classes(truth_path, manifest.classes)
    if problems:
        raise _damaged(source, f"{source / problems[0]}")
    _check_source_shards(source, manifest)
    places = _locations(source, manifest.split(TRAIN_LABELED).shards + manifest.split(TRAIN_UNLABELED).shards)
    if set(places) != set(truth):
        raise _damaged(source, f"{truth_path}: disagrees with the training shards")
    keys = sorted(truth)
    labels = [manifest.classes.index(truth[key]) for key in keys]
    handles: dict[Path, object] = {}
    held = contextlib.ExitStack()  # the temporary folder's lock, until NEWOUT is in place
    temp = partial_path(target)
    created: list[Path] = []
    made_temp = False
    try:
        chosen, how = _label_choice(keys, labels, lambda: [_origin(handles, key, places[key]) for key in keys],
                                    manifest, labels_per_class, label_fraction, labels_file, seed)
        note = _discard_leftover(temp)
        # From here on files are written, all under the temporary folder.
        created = make_dirs(target.parent)
        try:
            temp.mkdir()
        except FileExistsError:  # made by a re-split that started meanwhile
            raise ShardFormatError(f"{temp}: {_LOCK_WHO} started writing it; {_LOCK_FIX}") from None
        made_temp = True
        held.enter_context(folder_lock(temp, who=_LOCK_WHO, fix=_LOCK_FIX))
        (temp / MARKER_NAME).write_text(json.dumps({"source": str(source.resolve())}))
        tasks, records = _write_training_shards(temp, keys, labels, chosen, places, handles, seed, size, shard_bytes,
                                                progress)
        val = manifest.split(VAL)
        for position, name in enumerate(val.shards):
            copied = _copy_shard(source, temp, name, val.sha256[position])
            tasks.append(ShardTask(str(target), name, VAL, [], None, 0))
            records[name] = {"sha256": val.sha256[position], "count": val.counts[position], "bytes": copied,
                             "skipped": []}
        pack_args = {**manifest.pack_args, "labels_per_class": labels_per_class, "label_fraction": label_fraction,
                     "labels_file_sha256": sha256_file(labels_file) if labels_file else None, "seed": int(seed),
                     "shard_size": size}
        chosen_set = set(chosen)
        plan = PackPlan(
            classes=list(manifest.classes), tasks=tasks,
            labeled=sorted((keys[i], labels[i]) for i in chosen_set),
            train=[(key, label) for key, label in zip(keys, labels, strict=True)],
            skipped=list(manifest.skipped), label_split={**how, "seed": int(seed), "resplit_of": str(source.resolve())},
            val_split=manifest.val_split, pack_args=pack_args, description=f"re-split of {source}",
        )
        new_manifest = write_set_files(temp, plan, records)
        (temp / MARKER_NAME).unlink()
        os.replace(temp, target)  # NEWOUT appears whole, or not at all
    except BaseException as exc:
        if made_temp:
            shutil.rmtree(temp, ignore_errors=True)
        remove_empty_dirs(created)
        if isinstance(exc, OSError):
            raise ShardFormatError(f"{os_error_message(exc, target)}; nothing was written to {target}") from None
        raise
    finally:
        held.close()
        for handle in handles.values():
            handle.close()
    return PackSummary.of_set(target, new_manifest, time.perf_counter() - started, shards_written=len(tasks),
                              verb="re-split", note=note)


def _write_training_shards(folder: Path, keys, labels, chosen, places, handles, seed: int, size: int,
                           shard_bytes: int | None, progress: bool) -> tuple[list[ShardTask], dict[str, dict]]:
    chosen_set = set(chosen)
    parts = {
        TRAIN_LABELED: [(keys[i], labels[i]) for i in chosen],
        TRAIN_UNLABELED: [(keys[i], NO_LABEL) for i in range(len(keys)) if i not in chosen_set],
    }
    tasks, records = [], {}
    bar = tqdm(total=len(keys), desc="resplit", unit="img", disable=not progress)
    for split, entries in parts.items():
        entries = [entries[i] for i in shuffled(len(entries), seed, SPLIT_CODE[split])]
        sizes = [sample_tar_bytes(places[key][1][IMAGE_EXT][1]) for key, _ in entries]
        for number, chunk in enumerate(cut_into_shards(entries, sizes, size, shard_bytes)):
            task = ShardTask(str(folder), shard_name(split, number), split, [], None, 0)

            def samples(chunk=chunk):
                for key, label in chunk:
                    tar_path, components = places[key]
                    sample = {"__key__": key, CLASS_EXT: encode_class(label), LABEL_EXT: encode_label(label)}
                    for ext in (IMAGE_EXT, META_EXT):
                        if ext in components:
                            sample[ext] = _read_member(handles, tar_path, components[ext])
                    yield sample

            result = write_shard(folder, task.name, samples())
            records[task.name] = {"sha256": result.sha256, "count": result.count, "bytes": result.bytes, "skipped": []}
            tasks.append(task)
            bar.update(result.count)
    bar.close()
    return tasks, records
