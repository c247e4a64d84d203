"""A run's folder: created, locked (one run per folder) and cleared of what a killed run left, on the
main process; a refusal reaches every rank."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mt_scale.errors import MtScaleError, os_error_message
from shard_tools.locks import hold_folder, release_folder

if TYPE_CHECKING:
    from accelerate import Accelerator


def prepare_run_dir(run_dir: Path, *, remove: tuple[str, ...] = (), resuming: bool = False) -> Path | None:
    """Create `run_dir`, take its lock (one run per folder, held until `release_run_dir` or the end of
    the process), refuse checkpoints a new run would mix with, and delete the files or folders named
    in `remove` from it.

    Returns the topmost folder this created (None if `run_dir` existed), for cleanup when the run
    fails. An OS error is one MtScaleError naming `run_dir`.
    """
    import shutil

    from mt_scale.checkpoint import checkpoint_dirs

    missing = [path for path in (run_dir, *run_dir.parents) if not os.path.lexists(path)]
    created = missing[-1] if missing else None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise MtScaleError(f"{run_dir}: cannot create the run folder ({os_error_message(exc)}); "
                           "choose a writable run.output_dir (--set run.output_dir=DIR)") from None
    # Refused: the folder is the other run's now, even if this run made it a moment ago; it stays.
    hold_folder(run_dir, who="another mt-train run", error=MtScaleError,
                fix="wait for it to finish, or choose another folder with --set run.output_dir=DIR")
    try:
        if not resuming and checkpoint_dirs(run_dir):
            raise MtScaleError(
                f"{run_dir}: already holds a run with checkpoints; continue it with --resume or "
                "choose another folder with --set run.output_dir=DIR"
            )
        for name in remove:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    except (OSError, MtScaleError) as exc:
        if created is not None:
            release_folder(run_dir)
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(exc, MtScaleError):
            raise
        raise MtScaleError(
            f"{run_dir}: cannot create the run folder ({os_error_message(exc)}); "
            "choose a writable run.output_dir (--set run.output_dir=DIR)"
        ) from None
    return created


def open_run_dir(accelerator: Accelerator, run_dir: Path, *, resuming: bool, leftovers: tuple[str, ...]) -> Path | None:
    """Create `run_dir` (main process); returns the topmost folder this created, None if it existed.

    A new run refuses a folder with checkpoints and removes `leftovers`, what a run killed before its
    first checkpoint left.
    A refusal (another run holds the folder, checkpoints a new run would mix with) is raised on every
    rank, so none waits for a main process that has stopped.
    """
    created, refusal = None, None
    if accelerator.is_main_process:  # the main process writes the folder and holds its lock
        try:
            created = prepare_run_dir(run_dir, remove=() if resuming else leftovers, resuming=resuming)
        except MtScaleError as exc:
            refusal = str(exc)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]  # also the barrier every rank passes together
    if refusal is not None:
        raise MtScaleError(refusal)
    return created


def release_run_dir(run_dir: Path) -> None:
    """Drop the lock `open_run_dir` took on `run_dir` (a no-op where this process holds none)."""
    release_folder(run_dir)
