"""Where the torch backend's workers start: forkserver workers find the main module already run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from multiprocessing import process
from pathlib import Path

import pytest

from pipelines import workers

REPO = Path(__file__).resolve().parents[2]

# A training script as mt-train's process is one: SIGTERM has a handler (a stop flag), so the workers start
# from a forkserver. Its top level logs every run of itself: "pid parent-pid".
TRAINING_MAIN = """
import os, signal, sys
with open(os.environ["MAIN_RUNS"], "a") as log:
    log.write(f"{os.getpid()} {os.getppid()}\\n")
from pipelines import DataConfig, build_loaders
from pipelines.workers import fork_is_safe

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    assert not fork_is_safe()
    cfg = DataConfig(batch_size=64, labeled_per_batch=16, student_aug="digits-train", teacher_aug="digits-train",
                     eval_aug="digits-eval", workers=2, shuffle_buffer=64, eval_batch_size=128)
    loaders = build_loaders(sys.argv[1], cfg, backend="torch")
    for _ in range(2):  # two loader openings: four worker starts
        batch = next(iter(loaders.train))
        print("rows", len(batch["label"]), int((batch["label"] >= 0).sum()), flush=True)
    print("pid", os.getpid(), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("main", ["script", "module"])
@pytest.mark.timeout(300)
def test_forkserver_workers_find_the_main_module_run_once_in_the_server(digits_shards: Path, tmp_path: Path,
                                                                        main: str) -> None:
    (tmp_path / "train_script.py").write_text(TRAINING_MAIN)
    runs = tmp_path / "main-runs.txt"
    command = ([sys.executable, str(tmp_path / "train_script.py")] if main == "script"
               else [sys.executable, "-m", "train_script"])  # fmt: skip
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MAIN_RUNS=str(runs))
    result = subprocess.run([*command, str(digits_shards)], capture_output=True, text=True, timeout=280,
                            env=environment, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")
    assert lines[:2] == ["rows 64 16", "rows 64 16"]
    trainer = int(lines[2].split()[1])
    ran = [tuple(int(number) for number in line.split()) for line in runs.read_text().splitlines()]
    # the trainer, then its forkserver (a child of the trainer) once; before, every worker re-ran the module
    # (CPython < 3.13.8 drops "__main__" from the forkserver's preload), importing the main's imports anew
    assert [pid for pid, _ in ran][:1] == [trainer] and len(ran) == 2, ran
    assert ran[1][1] == trainer and ran[1][0] != trainer


def test_the_forkserver_hook_ignores_a_setting_from_another_process(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    script = tmp_path / "other_main.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    main_before, sigterm_before = sys.modules["__main__"], signal.getsignal(signal.SIGTERM)
    # the setting names a parent that is not this process's: a stale variable inherited by a grandchild
    workers._run_parent_main(json.dumps({"parent": os.getpid(), "init_main_from_path": str(script)}))
    assert not marker.exists() and sys.modules["__main__"] is main_before
    assert signal.getsignal(signal.SIGTERM) == sigterm_before


def test_a_main_module_that_fails_in_the_forkserver_leaves_it_running(tmp_path: Path) -> None:
    script = tmp_path / "failing_main.py"
    script.write_text("raise RuntimeError('only the workers report this')\n")
    main_before, sigterm_before = sys.modules["__main__"], signal.getsignal(signal.SIGTERM)
    try:
        workers._run_parent_main(json.dumps({"parent": os.getppid(), "init_main_from_path": str(script)}))
        # the forkserver outlives the trainer's pre-emption signal, sent to the whole process group:
        # the trainer reopens its loader from it after the signal ended the workers
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, sigterm_before)
    assert sys.modules["__main__"] is main_before  # the workers run it themselves and report the error
    assert not hasattr(process.current_process(), "_inheriting")
