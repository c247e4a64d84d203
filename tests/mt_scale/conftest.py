"""The step gate: a real mt-train (or each rank of an `accelerate launch`) that stops after its first
step, tells the test where it is, and waits until the test lets it go.

A test signals the trainer at a known point instead of polling its log for progress: the trainer
reports `<rank> <pid>` on a socket just before it fetches its second batch, then blocks until the
test closes the connection. Once released it runs step 2, so a stop signal sent while it waits
takes effect at the step-2 boundary on every rank.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Run as a script: `python gated_main.py HOST:PORT (-m MODULE | MODULE:FUNCTION) ARGS...`. The main
# guard matters: a forkserver (loader workers) imports this file as __mp_main__ and must not train.
GATED_MAIN = '''
import os, runpy, socket, sys, importlib

from pipelines.loaders import TrainLoader


def main():
    address, entry = sys.argv[1], sys.argv[2]
    real_iter, held = TrainLoader.__iter__, []

    def gated_iter(self):
        batches = real_iter(self)
        yield next(batches)
        if not held:  # the first iterator only (a loader reopened after a signal is not held again)
            held.append(True)
            host, port = address.rsplit(":", 1)
            with socket.create_connection((host, int(port))) as gate:
                gate.sendall(f"{os.environ.get('RANK', '0')} {os.getpid()}\\n".encode())
                gate.recv(1)  # returns when the test closes the connection
        yield from batches

    TrainLoader.__iter__ = gated_iter
    if entry == "-m":
        sys.argv = [sys.argv[3], *sys.argv[4:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        module, function = entry.split(":")
        sys.argv = [entry, *sys.argv[3:]]
        sys.exit(getattr(importlib.import_module(module), function)())


if __name__ == "__main__":
    main()
'''


# Run under `accelerate launch`: records the sample keys each rank trains and evaluates on (the
# pipelines' with_keys option), trains, and saves its teacher and last evaluation per rank.
RANK_SCRIPT = """
import os
import sys
from pathlib import Path

import torch

import pipelines
from pipelines.loaders import TrainLoader, ValLoader
from mt_scale.config import load_config
from mt_scale.train import train

out, tests, shards, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
sys.path.insert(0, tests)
from sync_counter import SyncCounter
labeled_rows = 16
seen = {"labeled": [], "unlabeled": [], "val": []}
build = pipelines.build_loaders
pipelines.build_loaders = lambda *args, **kwargs: build(*args, with_keys=True, **kwargs)
train_iter, val_iter = TrainLoader.__iter__, ValLoader.__iter__


def recording_train_iter(self):
    seen["world"] = [torch.distributed.get_world_size(), torch.distributed.get_backend()]
    for batch in train_iter(self):
        seen["labeled"] += batch["key"][:labeled_rows]
        seen["unlabeled"] += batch["key"][labeled_rows:]
        yield batch


def recording_val_iter(self):  # one list per pass (the student's, then the teacher's)
    seen["val"].append([])
    for batch in val_iter(self):
        seen["val"][-1] += list(batch.get("key", []))[: int(batch["valid"].sum())]
        yield batch


TrainLoader.__iter__, ValLoader.__iter__ = recording_train_iter, recording_val_iter
cfg = load_config("digits-demo", overrides=[
    f"run.shards={shards}", f"run.output_dir={out / 'run'}", f"data.labeled_per_batch={labeled_rows}", *overrides,
])
with SyncCounter() as counter:  # the host reads and collectives of the run, by step
    result = train(cfg, progress=False)  # ends the process group: the rank comes from the launcher
every, steps = cfg.run.log_every_steps, counter.stepped[-1]
allowed = {*range(every, steps + 1, every), steps}  # log steps and the end
seen["waits"] = {"stepped": counter.stepped, "reads": counter.between(counter.reads, allowed),
                 "collectives": counter.between(counter.collectives, allowed),
                 "at_log_steps": [counter.at(counter.collectives, step) for step in range(every, steps, every)]}
torch.save({"teacher": result.teacher.state_dict(), "final": result.final, "seen": seen},
           out / f"rank{os.environ['RANK']}.pt")
"""


class StepGate:
    """The test's side of the gate (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.script = folder / "gated_main.py"
        self.script.write_text(GATED_MAIN)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = "{}:{}".format(*self.server.getsockname())
        self.held: list[socket.socket] = []

    def command(self, *entry: str) -> list[str]:
        """The argv prefix that runs `entry` (`-m MODULE` or `MODULE:FUNCTION`) behind the gate."""
        return [sys.executable, str(self.script), self.address, *entry]

    def wait(self, process: subprocess.Popen, count: int = 1) -> dict[int, int]:
        """Block until `count` processes (ranks) wait at the gate; {rank: pid}. Fails if `process` ends first."""
        gone, wake = socket.socketpair()

        def wake_when_gone() -> None:
            process.wait()
            with contextlib.suppress(OSError):
                wake.close()  # `gone` reads as ended

        threading.Thread(target=wake_when_gone, daemon=True).start()
        found = {}
        try:
            while len(found) < count:
                ready, _, _ = select.select([self.server, gone], [], [])
                if self.server not in ready:
                    pytest.fail(f"the trainer ended before its first step:\n{process.communicate()[1][-3000:]}")
                connection, _ = self.server.accept()
                self.held.append(connection)
                rank, pid = connection.makefile("rb").readline().decode().split()
                found[int(rank)] = int(pid)
        finally:
            gone.close()
        return found

    def release(self) -> None:
        """Let every waiting process continue."""
        for connection in self.held:
            connection.close()
        self.held.clear()

    def close(self) -> None:
        self.release()
        self.server.close()


@pytest.fixture
def step_gate(tmp_path: Path) -> Iterator[StepGate]:
    gate = StepGate(tmp_path)
    try:
        yield gate
    finally:
        gate.close()


# One epoch (12 steps per rank), logged every 3 steps, evaluated and checkpointed at the end only,
# in-process loading: tests/mt_scale/test_checkpoint.py's SETTINGS with its two-rank log cadence,
# which its two-rank resume uses.
TWO_RANK_OVERRIDES = ("data.workers=0", "run.epochs=1", "optim.lr_rampdown_epochs=1", "run.eval_every_epochs=0",
                      "run.checkpoint_every_epochs=0", "run.log_every_steps=3")


@dataclass(frozen=True)
class TwoRankRun:
    """`out` holds rank0.pt and rank1.pt (teacher, last evaluation, the keys each rank read) and run/."""

    out: Path
    overrides: tuple[str, ...]


@pytest.fixture(scope="session")
def two_rank_run(digits_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> TwoRankRun:
    """A digits run by `accelerate launch` on two CPU processes (gloo), each recording what it read."""
    out = tmp_path_factory.mktemp("two_ranks")
    script = out / "rank_train.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         str(script), str(out), str(Path(__file__).parent), str(digits_shards), *TWO_RANK_OVERRIDES],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return TwoRankRun(out, TWO_RANK_OVERRIDES)
