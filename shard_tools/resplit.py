"""`mt-shard resplit`: a new label split of an existing set, made by copying tar members.

No image is decoded or re-encoded: the `.jpg` and `.json` members are copied byte for byte (found
through the DALI indexes), the `.cls`/`.lbl` members are rewritten, val shards are copied whole.
The training keys, their order rules and the shuffle are pack's, so re-splitting a set gives the
same training shards as packing the source again with the new split (same seed and shard size).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from shard_tools.files import partial_path, sha256_file
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
    encode_class,
    encode_label,
    index_name,
    parse_index,
    read_manifest,
    shard_name,
)
from shard_tools.pack import PackSummary
from shard_tools.plan import SPLIT_CODE, PackPlan, ShardTask, cut_into_shards, write_set_files
from shard_tools.split import choose_labeled, match_labels_file, read_labels_file, shuffled
from shard_tools.verify import read_key_classes
from shard_tools.writer import write_shard

_TAR_BLOCK = 512


def _locations(folder: Path, shards: list[str]) -> dict[str, tuple[Path, dict[str, tuple[int, int]]]]:
    found = {}
    for name in shards:
        idx = folder / index_name(name)
        if not idx.is_file():
            raise ShardFormatError(f"{idx}: missing index; run mt-shard verify {folder}")
        for key, components in parse_index(idx.read_text(), str(idx)):
            found[key] = (folder / name, components)
    return found


def _read_member(handles: dict, tar_path: Path, place: tuple[int, int]) -> bytes:
    handle = handles.get(tar_path)
    if handle is None:
        handle = handles[tar_path] = open(tar_path, "rb")  # noqa: SIM115 - closed in resplit's finally
    handle.seek(place[0])
    return handle.read(place[1])


def _copy_file(source: Path, target: Path) -> None:
    temp = partial_path(target)
    shutil.copyfile(source, temp)
    os.replace(temp, target)


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
    manifest = read_manifest(source)
    if sum(x is not None for x in (labels_per_class, label_fraction, labels_file)) > 1:
        raise ShardFormatError("give one of --labels-per-class, --label-fraction and --labels, not several")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ShardFormatError(f"{target}: exists and is not empty; choose another NEWOUT or delete it")
    truth_path = source / TRAIN_CLASSES_NAME
    if not truth_path.is_file():
        raise ShardFormatError(f"{truth_path}: missing, so the unlabeled images' classes are unknown; re-pack")
    truth = read_key_classes(truth_path)
    unknown = sorted({name for name in truth.values() if name not in manifest.classes})
    if unknown:
        raise ShardFormatError(f"{truth_path}: unknown class {unknown[0]!r}; run mt-shard verify {source}")
    places = _locations(source, manifest.split(TRAIN_LABELED).shards + manifest.split(TRAIN_UNLABELED).shards)
    if set(places) != set(truth):
        raise ShardFormatError(f"{truth_path}: disagrees with the training shards; run mt-shard verify {source}")
    keys = sorted(truth)
    labels = [manifest.classes.index(truth[key]) for key in keys]
    handles: dict[Path, object] = {}
    try:
        if labels_file is not None:
            if not Path(labels_file).is_file():
                raise ShardFormatError(f"{labels_file}: no such labels file; check --labels")
            entries = read_labels_file(labels_file, manifest.classes)
            origins = [
                json.loads(_read_member(handles, places[key][0], places[key][1][META_EXT])).get("source", key)
                if META_EXT in places[key][1] else key
                for key in keys
            ]
            chosen = match_labels_file(entries, keys, origins, labels)
            how = {"method": "file", "file": str(Path(labels_file).resolve())}
        else:
            chosen = choose_labeled(labels, manifest.num_classes, labels_per_class=labels_per_class,
                                    label_fraction=label_fraction, seed=seed, class_names=manifest.classes)
            if labels_per_class is not None:
                how = {"method": "labels_per_class", "labels_per_class": labels_per_class}
            elif label_fraction is not None:
                how = {"method": "fraction", "fraction": label_fraction}
            else:
                how = {"method": "all"}
        size = int(shard_size or manifest.pack_args.get("shard_size") or 1000)
        if size < 1:
            raise ShardFormatError(f"--shard-size {size}: must be at least 1")

        # From here on files are written.
        target.mkdir(parents=True, exist_ok=True)
        chosen_set = set(chosen)
        parts = {
            TRAIN_LABELED: [(keys[i], labels[i]) for i in chosen],
            TRAIN_UNLABELED: [(keys[i], NO_LABEL) for i in range(len(keys)) if i not in chosen_set],
        }
        tasks, records = [], {}
        bar = tqdm(total=len(keys), desc="resplit", unit="img", disable=not progress)
        for split, entries in parts.items():
            entries = [entries[i] for i in shuffled(len(entries), seed, SPLIT_CODE[split])]
            sizes = [
                7 * _TAR_BLOCK + -(-places[key][1][IMAGE_EXT][1] // _TAR_BLOCK) * _TAR_BLOCK for key, _ in entries
            ]
            chunks = cut_into_shards(entries, sizes, size, manifest.pack_args.get("shard_bytes"))
            for number, chunk in enumerate(chunks):
                task = ShardTask(str(target), shard_name(split, number), split, [], None, 0)

                def samples(chunk=chunk):
                    for key, label in chunk:
                        tar_path, components = places[key]
                        sample = {"__key__": key, CLASS_EXT: encode_class(label), LABEL_EXT: encode_label(label)}
                        for ext in (IMAGE_EXT, META_EXT):
                            if ext in components:
                                sample[ext] = _read_member(handles, tar_path, components[ext])
                        yield sample

                result = write_shard(target, task.name, samples())
                records[task.name] = {"sha256": result.sha256, "count": result.count, "bytes": result.bytes,
                                      "skipped": []}
                tasks.append(task)
                bar.update(result.count)
        bar.close()
    finally:
        for handle in handles.values():
            handle.close()

    val = manifest.split(VAL)
    for position, name in enumerate(val.shards):
        _copy_file(source / index_name(name), target / index_name(name))
        _copy_file(source / name, target / name)
        tasks.append(ShardTask(str(target), name, VAL, [], None, 0))
        records[name] = {"sha256": val.sha256[position], "count": val.counts[position],
                         "bytes": val.bytes[position] if val.bytes else (source / name).stat().st_size, "skipped": []}
    pack_args = {**manifest.pack_args, "labels_per_class": labels_per_class, "label_fraction": label_fraction,
                 "labels_file_sha256": sha256_file(labels_file) if labels_file else None, "seed": seed,
                 "shard_size": size}
    plan = PackPlan(
        classes=list(manifest.classes), tasks=tasks,
        labeled=sorted((keys[i], labels[i]) for i in chosen),
        train=[(key, label) for key, label in zip(keys, labels, strict=True)],
        skipped=list(manifest.skipped), label_split={**how, "seed": seed, "resplit_of": str(source.resolve())},
        val_split=manifest.val_split, pack_args=pack_args, description=f"re-split of {source}",
    )
    new_manifest = write_set_files(target, plan, records)
    counts = {name: new_manifest.split(name).num_samples for name in SPLITS}
    total = sum(sum(new_manifest.split(name).bytes) for name in SPLITS)
    return PackSummary(target, counts, len(new_manifest.skipped), total, time.perf_counter() - started,
                       shards_written=len(tasks), verb="re-split")
