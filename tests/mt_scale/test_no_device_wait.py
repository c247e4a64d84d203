"""Between log steps the loop never waits for the device: no host read of a computed tensor, no collective.

On a GPU each such read is a synchronisation, and the step behind it waits. Counted here on the CPU
by tests/mt_scale/sync_counter.py (the two-process version, with collectives, is in test_distributed.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mt_scale.config import load_config
from mt_scale.errors import MtScaleError
from mt_scale.report import read_metrics
from mt_scale.train import train

sys.path.insert(0, str(Path(__file__).parent))
from sync_counter import SyncCounter  # noqa: E402

STEPS_PER_EPOCH = 25  # 1,208 unlabeled digits / 48 unlabeled rows per batch
LOG_EVERY = 4


def digits_config(shards: Path, out: Path, *extra: str):
    return load_config("digits-demo", overrides=[
        f"run.shards={shards}", f"run.output_dir={out}", "data.workers=0", "run.epochs=1",
        "optim.lr_rampdown_epochs=1", "run.eval_every_epochs=0", f"run.log_every_steps={LOG_EVERY}", *extra,
    ])  # fmt: skip


def test_no_host_read_between_log_steps(digits_shards: Path, tmp_path: Path) -> None:
    with SyncCounter() as counter:
        result = train(digits_config(digits_shards, tmp_path / "run"), progress=False)
    assert counter.stepped == list(range(1, STEPS_PER_EPOCH + 1))
    log_steps = set(range(LOG_EVERY, STEPS_PER_EPOCH, LOG_EVERY))
    allowed = {*log_steps, STEPS_PER_EPOCH}  # log steps, and the end (evaluation, checkpoint, export)
    assert counter.between(counter.reads, allowed) == {}
    assert not any(inside for _, inside in counter.reads)
    # each log step reads its window once (the summed loss terms), whatever the window's length
    assert {step: counter.at(counter.reads, step) for step in sorted(log_steps)} == dict.fromkeys(sorted(log_steps), 1)
    assert counter.collectives == {}  # one process: no collective at all
    # the log is still complete and finite: every log step, and the last step
    rows = [row for row in read_metrics(result.run_dir / "metrics.csv") if row["kind"] == "train"]
    assert [row["step"] for row in rows] == [float(s) for s in (*sorted(log_steps), STEPS_PER_EPOCH)]
    assert all(row["loss"] > 0 for row in rows)


def test_divergence_is_caught_at_the_next_log_step(digits_shards: Path, tmp_path: Path) -> None:
    # an LR this large overflows within a few steps; the loop notices at the log step after it
    cfg = digits_config(digits_shards, tmp_path / "run", "optim.lr=1e12", "optim.initial_lr=1e12")
    with SyncCounter() as counter, pytest.raises(MtScaleError, match="training diverged") as error:
        train(cfg, progress=False)
    stopped_after = counter.steps_done
    assert stopped_after % LOG_EVERY == 0 and stopped_after < STEPS_PER_EPOCH
    assert f"by step {stopped_after}:" in str(error.value) and "lower optim.lr" in str(error.value)
    assert not (tmp_path / "run").exists()  # failed before its first checkpoint: nothing left behind
