"""The one step: mt-train's loop and `mt-bench train` run the same function and get the same numbers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mt_scale.bench.common import Device
from mt_scale.bench.train import bench_accelerator, prepare_steps
from mt_scale.checkpoint import checkpoint_dirs
from mt_scale.config import load_config
from mt_scale.losses import LOSS_NAMES, symmetric_mse_loss
from mt_scale.optim import create_optimizer, create_scheduler
from mt_scale.step import MeanTeacherStep, StepMetrics, create_training
from mt_scale.train import train
from pipelines import normalize

STEPS_PER_EPOCH = 25  # the digits set's unlabeled split in batches of 48 unlabeled rows
SETTINGS = ["data.workers=0", "run.epochs=1", "optim.lr_rampdown_epochs=1", "run.eval_every_epochs=0",
            "run.checkpoint_every_epochs=0"]  # fmt: skip
CPU = Device("cpu", "fp32", channels_last=False)


def digits_config(shards: Path, out: Path, *extra: str):
    return load_config("digits-demo", overrides=[f"run.shards={shards}", f"run.output_dir={out}", *SETTINGS, *extra])


def record_loop(monkeypatch: pytest.MonkeyPatch, cfg, steps: int):
    """Run mt-train's loop for `steps` steps; returns (its result, [(batch, step_index, epoch, metrics)])."""
    calls = []
    original = MeanTeacherStep.__call__

    def recording(self, batch, step_index, epoch=None):
        kept = {key: value.clone() for key, value in batch.items() if isinstance(value, torch.Tensor)}
        metrics = original(self, batch, step_index, epoch)
        calls.append((kept, step_index, epoch, metrics))
        return metrics

    monkeypatch.setattr(MeanTeacherStep, "__call__", recording)
    result = train(cfg, progress=False, stop_after_steps=steps)
    monkeypatch.setattr(MeanTeacherStep, "__call__", original)
    return result, calls


@pytest.mark.parametrize("mode", ["mean_teacher", "supervised_baseline"])
def test_loop_and_bench_take_identical_steps(
    mode: str, digits_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = ["mt.enabled=false"] if mode == "supervised_baseline" else []
    result, calls = record_loop(monkeypatch, digits_config(digits_shards, tmp_path / "run", *extra), steps=3)
    assert [call[1] for call in calls] == [0, 1, 2]

    # the bench's path: its own accelerator and parts from the Mean Teacher config, the same batches
    bench_cfg = digits_config(digits_shards, tmp_path / "unused")
    step = prepare_steps(bench_cfg, bench_accelerator(CPU), num_classes=10, steps_per_epoch=STEPS_PER_EPOCH)[mode]
    for batch, step_index, epoch, loop_metrics in calls:
        metrics = step(batch, step_index, epoch)
        assert metrics.step == loop_metrics.step == step_index + 1 and metrics.rows == loop_metrics.rows
        assert metrics.consistency_weight == loop_metrics.consistency_weight
        assert list(metrics.losses) == list(LOSS_NAMES)
        for name in LOSS_NAMES:
            assert torch.equal(metrics.losses[name], loop_metrics.losses[name]), name
    assert calls[0][3].rows == (64 if mode == "mean_teacher" else 16)
    assert (calls[-1][3].consistency_weight > 0) == (mode == "mean_teacher")

    saved = load_file(str(checkpoint_dirs(tmp_path / "run")[-1] / "model.safetensors"))
    student = step.student.state_dict()
    assert saved.keys() == student.keys()
    for key, value in saved.items():
        assert torch.equal(value, student[key]), key
    teacher = step.teacher.state_dict()
    for key, value in result.teacher.state_dict().items():
        assert torch.equal(value, teacher[key]), key


def test_without_teacher_it_is_the_plain_supervised_step(digits_shards: Path, tmp_path: Path) -> None:
    cfg = digits_config(digits_shards, tmp_path / "run")
    accelerator = bench_accelerator(CPU)
    parts = create_training(cfg, accelerator, num_classes=10, steps_per_epoch=STEPS_PER_EPOCH)
    plain = MeanTeacherStep.create(cfg, accelerator, *parts, use_teacher=False)
    teacher_before = copy.deepcopy(parts.teacher.state_dict())
    # by hand: a copy of the student, cross-entropy over the labeled rows plus the heads' logit distance
    student = copy.deepcopy(parts.student)
    optimizer = create_optimizer(cfg.optim, student)
    scheduler = create_scheduler(cfg.optim, optimizer, STEPS_PER_EPOCH)

    generator = torch.Generator().manual_seed(0)
    for step_index in range(2):
        batch = {
            "student": torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator),
            "teacher": torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator),
            "label": torch.where(torch.arange(64) < 16, torch.randint(0, 10, (64,), generator=generator), -1),
        }
        metrics = plain(batch, step_index, epoch=3.0)
        assert isinstance(metrics, StepMetrics) and metrics.stepped and metrics.step == step_index + 1
        assert metrics.consistency_weight == 0 and metrics.rows == 64
        assert float(metrics.losses["consistency"]) == float(metrics.losses["teacher_class"]) == 0.0

        class_logits, consistency_logits = student(normalize(batch["student"], cfg.data.mean, cfg.data.std))
        class_term = F.cross_entropy(class_logits, batch["label"], ignore_index=-1, reduction="sum") / 64
        distance = cfg.mt.logit_distance_cost * symmetric_mse_loss(class_logits, consistency_logits) / 64
        (class_term + distance).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        assert torch.equal(metrics.losses["class"], class_term.detach())
        assert torch.equal(metrics.losses["total"], (class_term + distance).detach())

    for key, value in student.state_dict().items():
        assert torch.equal(parts.student.state_dict()[key], value), key
    for key, value in parts.teacher.state_dict().items():  # no EMA update, no BatchNorm statistics
        assert torch.equal(value, teacher_before[key]), key


def test_gradient_accumulation_steps_once_per_window(digits_shards: Path, tmp_path: Path) -> None:
    from accelerate import Accelerator

    cfg = digits_config(digits_shards, tmp_path / "run", "run.grad_accum_steps=2")
    bench_accelerator(CPU)  # a fresh Accelerate state
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    parts = create_training(cfg, accelerator, num_classes=10, steps_per_epoch=STEPS_PER_EPOCH)
    step = MeanTeacherStep.create(cfg, accelerator, *parts)
    batch = {
        "student": torch.full((64, 3, 32, 32), 100, dtype=torch.uint8),
        "teacher": torch.full((64, 3, 32, 32), 120, dtype=torch.uint8),
        "label": torch.where(torch.arange(64) < 16, torch.arange(64) % 10, -1),
    }
    weights = [p.detach().clone() for p in parts.teacher.parameters()]
    first = step(batch, 0, 0.0)
    assert not first.stepped and first.step == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, parts.teacher.parameters(), strict=True))
    second = step(batch, 0, 0.0)
    assert second.stepped and second.step == 1
    assert not all(torch.equal(a, b) for a, b in zip(weights, parts.teacher.parameters(), strict=True))
