"""The step as CUDA graphs (model.cuda_graph): eager with one line where capture is impossible, the same
training as eager on a GPU, and no wait for the device inside a step."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from mt_scale.bench.common import Device
from mt_scale.bench.train import bench_accelerator
from mt_scale.config import load_config
from mt_scale.graph import WARMUP_WINDOWS
from mt_scale.step import MeanTeacherStep, create_training

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_config(*extra: str):
    return load_config("digits-demo", overrides=["data.batch_size=16", "data.labeled_per_batch=4", *extra])


def synthetic_batches(count: int, rows: int = 16, labeled: int = 4, size: int = 32) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        labels = torch.randint(0, 10, (rows,), generator=generator)
        batches.append({
            "student": torch.randint(0, 256, (rows, 3, size, size), dtype=torch.uint8, generator=generator),
            "teacher": torch.randint(0, 256, (rows, 3, size, size), dtype=torch.uint8, generator=generator),
            "label": torch.where(torch.arange(rows) < labeled, labels, -1),
        })  # fmt: skip
    return batches


def build_step(cfg, device: Device) -> MeanTeacherStep:
    accelerator = bench_accelerator(device)
    parts = create_training(cfg, accelerator, 10, steps_per_epoch=100)
    return MeanTeacherStep.create(cfg, accelerator, *parts)


def test_without_cuda_the_step_is_eager_and_says_why(digits_shards: Path, tmp_path: Path, capsys) -> None:
    from mt_scale.train import train

    cfg = small_config(f"run.shards={digits_shards}", f"run.output_dir={tmp_path / 'run'}", "data.workers=0",
                       "run.epochs=1", "optim.lr_rampdown_epochs=1")  # fmt: skip
    step = build_step(cfg, Device("cpu", "fp32", channels_last=False))
    assert step.graphs is None and step.mode == "eager (no CUDA device)"
    off = build_step(small_config("model.cuda_graph=false"), Device("cpu", "fp32", channels_last=False))
    assert off.mode == "eager (model.cuda_graph=false)"
    train(cfg, progress=False, stop_after_steps=1)
    assert "step: eager (no CUDA device)\n" in capsys.readouterr().out


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("accumulation", [1, 2])
def test_graphed_steps_train_as_eager_steps_do(accumulation: int) -> None:
    device = Device("cuda", "bf16", channels_last=True)
    cfg = small_config("run.mixed_precision=bf16", "model.channels_last=true",
                       f"run.grad_accum_steps={accumulation}")  # fmt: skip
    windows = WARMUP_WINDOWS + 4
    batches = synthetic_batches(windows * accumulation)
    results = {}
    for graphed in (True, False):
        step = build_step(copy.deepcopy(cfg) if graphed else small_config(
            "run.mixed_precision=bf16", "model.channels_last=true", f"run.grad_accum_steps={accumulation}",
            "model.cuda_graph=false"), device)  # fmt: skip
        step.accelerator.gradient_accumulation_steps = accumulation
        losses, index = [], 0
        for number, batch in enumerate(batches):
            out = step(batch, index, epoch=number / len(batches))
            index = out.step
            losses.append(out.losses["total"].float().cpu())
        assert index == windows
        results[graphed] = (step, torch.stack(losses))
    graphed_step, eager_step = results[True][0], results[False][0]
    assert graphed_step.mode.startswith("CUDA graph") and graphed_step.graphs.graphs
    torch.testing.assert_close(results[True][1], results[False][1], rtol=2e-2, atol=2e-2)
    for a, b in zip(graphed_step.teacher.parameters(), eager_step.teacher.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
    assert graphed_step.optimizer.param_groups[0]["lr"] == eager_step.optimizer.param_groups[0]["lr"]
    assert isinstance(graphed_step.optimizer.param_groups[0]["lr"], float)  # checkpoints as in eager mode


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", ["true", "false"])
def test_a_step_never_waits_for_the_device(cuda_graph: str) -> None:
    step = build_step(small_config("run.mixed_precision=bf16", f"model.cuda_graph={cuda_graph}"),
                      Device("cuda", "bf16", channels_last=False))  # fmt: skip
    batches = [{key: value.pin_memory() for key, value in batch.items()} for batch in synthetic_batches(16)]
    index = 0
    for number, batch in enumerate(batches):
        checked = number > WARMUP_WINDOWS  # after the warm-up and the capture
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            index = step(batch, index, epoch=1.0).step
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert index == len(batches)
