"""Two CPU processes (accelerate launch, gloo): one teacher on both ranks, each rank its own shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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

out, shards = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, sys.argv[3])
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
    f"run.shards={shards}", f"run.output_dir={out / 'run'}", "data.workers=0", "run.epochs=1",
    "optim.lr_rampdown_epochs=1", "run.eval_every_epochs=0", "run.log_every_steps=2",
    f"data.labeled_per_batch={labeled_rows}",
])
with SyncCounter() as counter:
    result = train(cfg, progress=False)  # ends the process group: the rank comes from the launcher
steps = counter.stepped[-1]
allowed = {*range(2, steps + 1, 2), steps}  # log steps (every 2) and the end
seen["waits"] = {"stepped": counter.stepped, "reads": counter.between(counter.reads, allowed),
                 "collectives": counter.between(counter.collectives, allowed),
                 "at_log_steps": [counter.at(counter.collectives, step) for step in range(2, steps, 2)]}
torch.save({"teacher": result.teacher.state_dict(), "final": result.final, "seen": seen},
           out / f"rank{os.environ['RANK']}.pt")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_train_one_teacher(digits_shards: Path, tmp_path: Path) -> None:
    script = tmp_path / "rank_train.py"
    script.write_text(RANK_SCRIPT)
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(script), str(tmp_path), str(digits_shards), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["seen"]["world"] == ranks[1]["seen"]["world"] == [2, "gloo"]
    # between log steps neither rank read a computed tensor or joined a collective; train() called
    # without a SIGTERM handler has no stop flag to exchange, so the log steps hold none either
    for rank in ranks:
        waits = rank["seen"]["waits"]
        assert waits["stepped"] == list(range(1, 13)) and waits["reads"] == {} and waits["collectives"] == {}
        assert waits["at_log_steps"] == [0] * 5

    # the same teacher (parameters and averaged BatchNorm statistics) and the same scores on both ranks
    teacher0, teacher1 = ranks[0]["teacher"], ranks[1]["teacher"]
    assert teacher0.keys() == teacher1.keys()
    for key in teacher0:
        assert torch.equal(teacher0[key], teacher1[key]), key
    assert ranks[0]["final"] == ranks[1]["final"]

    # each rank its own unlabeled shards (disjoint samples); val: each sample on exactly one rank
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    unlabeled = [set(r["seen"]["unlabeled"]) for r in ranks]
    assert unlabeled[0] and unlabeled[1] and not unlabeled[0] & unlabeled[1]
    passes = [r["seen"]["val"] for r in ranks]
    assert len(passes[0]) == len(passes[1]) == 2  # student and teacher evaluated once, at the end
    val = [passes[0][0], passes[1][0]]
    assert passes[0][1] == val[0] and passes[1][1] == val[1]
    assert not set(val[0]) & set(val[1])
    assert len(val[0]) + len(val[1]) == len(set(val[0]) | set(val[1])) == sum(manifest["splits"]["val"]["counts"])
    # both ranks took the same steps: rank 0 holds 3 of the 5 unlabeled shards, rank 1 holds 2
    steps = len(ranks[1]["seen"]["unlabeled"]) // 48
    assert len(ranks[0]["seen"]["unlabeled"]) == len(ranks[1]["seen"]["unlabeled"])

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == steps
    assert report["val_count"] == len(val[0]) + len(val[1])
    assert report["lr"] == pytest.approx(2 * report["config"]["optim"]["lr"])  # per-device LR x 2 processes
    assert report["final"]["teacher_top1_error"] == pytest.approx(ranks[0]["final"]["teacher_top1_error"])
