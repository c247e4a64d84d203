"""Two CPU processes (accelerate launch, gloo): one teacher on both ranks, each rank its own shards
(the session's two-rank run, tests/mt_scale/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# the session's reference runs: every test that reads them runs in one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("reference_runs")


@pytest.mark.slow
def test_two_cpu_processes_train_one_teacher(two_rank_run, digits_shards: Path) -> None:
    out = two_rank_run.out
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["seen"]["world"] == ranks[1]["seen"]["world"] == [2, "gloo"]
    # between log steps neither rank read a computed tensor or joined a collective (train() called
    # without a SIGTERM handler has no stop flag to exchange, so the log steps hold none either)
    every = next(int(s.split("=")[1]) for s in two_rank_run.overrides if s.startswith("run.log_every_steps="))
    for rank in ranks:
        waits = rank["seen"]["waits"]
        assert waits["stepped"] == list(range(1, 13)) and waits["reads"] == {} and waits["collectives"] == {}
        assert waits["at_log_steps"] == [0] * len(range(every, 12, every))

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

    report = json.loads((out / "run" / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == steps
    assert report["val_count"] == len(val[0]) + len(val[1])
    assert report["lr"] == pytest.approx(2 * report["config"]["optim"]["lr"])  # per-device LR x 2 processes
    assert report["final"]["teacher_top1_error"] == pytest.approx(ranks[0]["final"]["teacher_top1_error"])
