"""One writer per folder: a second pack, resplit or training run on a folder being written is refused
in one line naming the folder and the holder's PID; a killed holder leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mt_scale.errors import MtScaleError
from mt_scale.report import prepare_run_dir, release_run_dir
from shard_tools.format import MANIFEST_NAME
from shard_tools.locks import folder_lock, hold_folder, release_folder
from shard_tools.samples import write_photo_tree

# A process that locks the folder in argv[1] as a writer does, says so on stdout, and holds the lock
# until its stdin closes: the other writer of each race.
_HOLDER = ("import sys; from shard_tools.locks import hold_folder; "
           "hold_folder(sys.argv[1], who='a writer', fix='wait'); print('locked', flush=True); sys.stdin.read()")


@pytest.fixture
def holder() -> Iterator[Callable[[Path], subprocess.Popen]]:
    """holder(folder) -> a running process that holds `folder`'s lock (it has said so: no sleep)."""
    started: list[subprocess.Popen] = []

    def start(folder: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
        started.append(proc)
        assert proc.stdout.readline() == "locked\n"  # the event: the lock is held now
        return proc

    yield start
    for proc in started:
        proc.stdin.close()
        proc.wait(timeout=60)


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def test_second_pack_into_a_folder_being_packed_is_refused(tmp_path: Path, holder, cli_error) -> None:
    tree = write_photo_tree(tmp_path / "tree", count=6, num_classes=2, size=(40, 30), seed=1)
    out = tmp_path / "out"
    out.mkdir()
    proc = holder(out)
    argv = ["pack", str(tree), str(out), "--val-fraction", "0", "--workers", "1", "--quiet"]
    line = cli_error(argv)
    assert line == (f"mt-shard pack: error: {out}: another mt-shard pack or resplit (PID {proc.pid}) is writing "
                    "this folder; wait for it to finish, or choose another OUT")
    assert list(out.iterdir()) == []  # nothing written beside the other writer
    _release(proc)
    from shard_tools.cli import main

    assert main(argv) == 0 and (out / MANIFEST_NAME).is_file()


def test_resplit_into_a_folder_another_resplit_writes_is_refused(set_copy: Path, tmp_path: Path, holder,
                                                                 cli_error) -> None:
    new = tmp_path / "new"
    temp = tmp_path / ".new.partial"  # where a running re-split builds NEWOUT
    temp.mkdir()
    (temp / ".mt-shard-resplit").write_text("{}")
    proc = holder(temp)
    line = cli_error(["resplit", str(set_copy), str(new), "--labels-per-class", "3", "--quiet"])
    assert line == (f"mt-shard resplit: error: {temp}: another mt-shard resplit (PID {proc.pid}) is writing this "
                    "folder; wait for it to finish, or choose another NEWOUT")
    assert (temp / ".mt-shard-resplit").is_file() and not new.exists()  # the running one's work is kept


def test_second_training_run_on_a_run_folder_is_refused(tmp_path: Path, holder) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step\n1\n")
    proc = holder(run)
    with pytest.raises(MtScaleError) as refused:
        prepare_run_dir(run, remove=("metrics.csv",))
    assert str(refused.value) == (f"{run}: another mt-train run (PID {proc.pid}) is writing this folder; wait for "
                                  "it to finish, or choose another folder with --set run.output_dir=DIR")
    assert (run / "metrics.csv").read_text() == "step\n1\n"  # the running run's files are untouched
    _release(proc)
    assert prepare_run_dir(run, remove=("metrics.csv",)) is None and not (run / "metrics.csv").exists()
    prepare_run_dir(run)  # the same process may open its own folder again (a resume in one process)
    release_run_dir(run)


def test_a_killed_writer_leaves_no_stale_lock(tmp_path: Path, holder) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    proc = holder(folder)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    with folder_lock(folder, who="x", fix="y"):  # the kernel dropped the dead writer's lock
        pass
    hold_folder(folder, who="x", fix="y")
    release_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == []  # no lock file is left behind
