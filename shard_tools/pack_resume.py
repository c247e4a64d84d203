"""What a pack leaves in OUT between runs, and how the next run reads it: the resume state.

`.mt-shard-pack.json` is a journal: its first line (written whole, then renamed) records the options
that decide the output (`pack_args`) and the shards finished before this run; each worker then
appends one line per shard it finishes (plan hash, sha256, count, bytes, skipped images) before the
shard takes its final name, so every finished shard on disk is in the journal whenever the pack is
killed. A rerun with the same options keeps the finished shards whose plan and sha256 still match
and packs the rest; a finished set is checked against its manifest; anything else in OUT is refused.
Only the set's own files and this state file (and their temporaries) are ever deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from shard_tools.bounded import load_json
from shard_tools.errors import os_error_message
from shard_tools.files import (
    atomic_write,
    is_set_file,
    partial_target,
    remove_empty_dirs,
    remove_partials,
    sha256_file,
)
from shard_tools.format import MANIFEST_NAME, SPLITS, ShardFormatError, index_name
from shard_tools.manifest import Manifest, read_manifest
from shard_tools.plan import PackPlan, ShardTask

STATE_NAME = ".mt-shard-pack.json"  # resume state of an unfinished pack; removed when it completes


def is_pack_output(name: str) -> bool:
    """A file name pack writes into OUT (so only these, and their temporaries, are ever deleted)."""
    return is_set_file(name) or name == STATE_NAME


def _damaged_shard(out: Path, manifest: Manifest) -> str | None:
    """What is wrong with a finished set's shards (missing, other size, other sha256), or None."""
    shards = [(name, manifest.split(split), position) for split in SPLITS
              for position, name in enumerate(manifest.split(split).shards)]
    for name, info, position in shards:  # the cheap checks first
        path = out / name
        if not path.is_file() or not (out / index_name(name)).is_file():
            return f"{name if not path.is_file() else index_name(name)} is missing"
        if info.bytes and path.stat().st_size != info.bytes[position]:
            return f"{name} is not the size manifest.json gives"
    for name, info, position in shards:
        if sha256_file(out / name) != info.sha256[position]:
            return f"{name}'s sha256 differs from manifest.json"
    return None


def out_state(out: Path, pack_args: dict) -> str:
    """'new', 'resume' or 'complete'; raises when OUT holds something else."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise ShardFormatError(f"{out}: exists and is not a folder; choose another OUT")
    if (out / MANIFEST_NAME).exists():
        if read_manifest(out).pack_args != pack_args:
            raise ShardFormatError(f"{out}: holds a different shard set; choose another OUT or delete it")
        damage = _damaged_shard(out, read_manifest(out))
        if damage:
            raise ShardFormatError(f"{out}: already packed with these options, but {damage}; restore it, or delete "
                                   f"{out} and pack again (mt-shard verify {out} lists every problem)")
        return "complete"
    state_file = out / STATE_NAME
    if state_file.exists():
        if read_state(out).get("pack_args") == pack_args:
            return "resume"
        raise ShardFormatError(f"{out}: holds an unfinished pack with other options; rerun that command or delete {out}")
    # Only temporaries of our own names count as leftovers; a user's `notes.partial` is theirs.
    if any(not is_pack_output(partial_target(p.name) or "") for p in out.iterdir()):
        raise ShardFormatError(f"{out}: exists and is not empty; choose another OUT or delete it")
    return "new"


def _sound_record(record: object) -> bool:
    """A resume record as pack writes it (a damaged state file's records are packed again)."""
    return (isinstance(record, dict) and isinstance(record.get("sha256"), str)
            and all(isinstance(record.get(k), int) for k in ("count", "bytes"))
            and isinstance(record.get("skipped"), list)
            and all(isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("path", "reason", "key"))
                    for e in record["skipped"]))


def _shard_done(out: Path, record: dict | None, task: ShardTask) -> bool:
    tar_path = out / task.name
    if not _sound_record(record) or record.get("plan") != task.plan_hash or not tar_path.is_file():
        return False
    if not (out / index_name(task.name)).exists():
        return False
    return sha256_file(tar_path) == record["sha256"]


def finished_shards(out: Path, plan: PackPlan, resuming: bool) -> dict[str, dict]:
    """Records of the shards an interrupted run finished and that still match the plan; clears the rest."""
    remove_partials(out, is_pack_output)
    records = read_state(out)["shards"] if resuming else {}
    records = {t.name: records[t.name] for t in plan.tasks if _shard_done(out, records.get(t.name), t)}
    planned = {t.name for t in plan.tasks} | {index_name(t.name) for t in plan.tasks}
    for leftover in [*out.glob("*.tar"), *out.glob("*.idx")]:
        if leftover.name not in planned and is_pack_output(leftover.name):
            leftover.unlink()  # from an earlier plan of this pack (the input changed since)
    return records


def abandon(out: Path, created: list[Path], records: dict, exc: OSError) -> ShardFormatError:
    """After an OS error while writing: no half-written file stays; a pack that finished no shard
    leaves nothing at all, one that did keeps its shards to resume. Returns the one-line error."""
    with contextlib.suppress(OSError):  # cleaning up must not hide the error itself
        remove_partials(out, is_pack_output)
        if not records:
            (out / STATE_NAME).unlink(missing_ok=True)
            remove_empty_dirs(created)
    if not records:
        return ShardFormatError(f"{os_error_message(exc, out)}; nothing was kept; fix that (space, permissions) "
                                "and run the command again")
    return ShardFormatError(f"{os_error_message(exc, out)}; {len(records)} finished shard(s) kept in {out}: fix "
                            f"that (space, permissions) and run the same command again to resume, or delete {out}")


def save_state(out: Path, pack_args: dict, records: dict[str, dict]) -> None:
    """Start the journal: the options and the shards finished so far (one line, written whole)."""
    atomic_write(out / STATE_NAME, json.dumps({"pack_args": pack_args, "shards": records}))


def journal_shard(out: Path, name: str, record: dict) -> None:
    """Append one finished shard to the journal (one write of one line; any worker, any order).

    The line starts with its newline, so a line cut short by a kill stays alone on its line and is
    ignored, and the lines after it still read.
    """
    line = b"\n" + json.dumps({"shard": name, **record}).encode()
    descriptor = os.open(out / STATE_NAME, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(descriptor, line)
    finally:
        os.close(descriptor)


def read_state(out: Path) -> dict:
    """{"pack_args": ..., "shards": {name: record}} from the journal; what does not read is left out
    (a damaged journal's shards are packed again)."""
    try:
        lines = (out / STATE_NAME).read_bytes().split(b"\n")
    except OSError:
        lines = []
    state: dict = {"pack_args": None, "shards": {}}
    for number, line in enumerate(lines):
        try:
            entry = load_json(line, str(out / STATE_NAME), ShardFormatError, fix="")  # bounded: depth, UTF-8
        except ShardFormatError:
            continue
        if not isinstance(entry, dict):
            continue
        if number == 0:
            shards = entry.get("shards")
            state = {"pack_args": entry.get("pack_args"), "shards": dict(shards) if isinstance(shards, dict) else {}}
        elif isinstance(entry.get("shard"), str):
            state["shards"][entry.pop("shard")] = entry
    return state
