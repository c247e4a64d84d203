"""Two runs on one folder: mt-train refuses a run folder another run is writing, in one line naming
the folder and the holder's PID, and touches nothing in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mt_scale.cli import train_main

_HOLDER = ("import sys; from shard_tools.locks import hold_folder; "
           "hold_folder(sys.argv[1], who='a run', fix='wait'); print('locked', flush=True); sys.stdin.read()")


def test_a_second_run_on_a_run_folder_is_refused(digits_shards: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("the other run's\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "locked\n"  # the event: the other run holds the folder
        status = train_main(["--preset", "digits-demo", "--set", f"run.shards={digits_shards}", "--set",
                             f"run.output_dir={run}", "--set", "data.workers=0", "--no-progress"])
        err = capsys.readouterr().err
        assert status == 2 and "Traceback" not in err
        assert err == (f"mt-train: error: {run}: another mt-train run (PID {holder.pid}) is writing this folder; "
                       "wait for it to finish, or choose another folder with --set run.output_dir=DIR\n")
        assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
        assert (run / "config.yaml").read_text() == "the other run's\n"
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


@pytest.mark.slow
def test_two_ranks_both_stop_when_their_run_folder_is_taken(digits_shards: Path, tmp_path: Path) -> None:
    """The main process is refused the folder; the other rank learns it and stops too (no rank waits)."""
    import socket

    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "locked\n"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        accelerate = Path(sys.executable).parent / "accelerate"
        done = subprocess.run(
            [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m",
             "mt_scale.train", "--preset", "digits-demo", "--set", f"run.shards={digits_shards}", "--set",
             f"run.output_dir={run}", "--set", "data.workers=0", "--no-progress"],
            capture_output=True, text=True, timeout=300, env=env)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert done.returncode != 0
    assert done.stderr.count(f"mt-train: error: {run}: another mt-train run (PID {holder.pid}) is writing this "
                             "folder") == 1, done.stderr[-2000:]
    assert list(run.iterdir()) == []
