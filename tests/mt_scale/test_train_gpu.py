"""On the GPU (tests marked `gpu`): mt_scale.train.train with the DALI loader in bf16 stops, resumes and
ends with the same student and teacher as a run that was never stopped."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# cuBLAS reads this when CUDA starts: deterministic matrix products for the runs that must match.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels while the runs that must match run (ops without one only warn)."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def largest_difference(first: Path, second: Path) -> float:
    """The largest absolute difference between two safetensors files holding the same tensors."""
    from safetensors.torch import load_file

    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.timeout(600)
def test_gpu_training_resumes_exactly(photo_shards: Path, tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    from mt_scale.checkpoint import STUDENT_NAME, TEACHER_NAME, checkpoint_dirs
    from mt_scale.config import load_config
    from mt_scale.train import train

    def config(run_dir: Path):
        # 48 unlabeled images in rows of 12 (+4 labeled): 4 steps an epoch, 12 in all.
        return load_config(preset="imagenet-10pct-resnet152", overrides=[
            f"run.shards={photo_shards}", f"run.output_dir={run_dir}", "model.name=resnet18",
            "run.mixed_precision=bf16", "run.batch_scope=per_device", "data.batch_size=16",
            "data.labeled_per_batch=4", "data.backend=dali", "data.workers=4", "data.eval_batch_size=8",
            "run.epochs=3", "optim.lr_rampup_epochs=1", "optim.lr_rampdown_epochs=4",
            "mt.consistency_rampup_epochs=1", "run.eval_every_epochs=0", "run.checkpoint_every_epochs=0",
            "run.log_every_steps=2", "run.log_with=none",
        ])  # fmt: skip

    straight, split = tmp_path / "straight", tmp_path / "split"
    with deterministic():
        whole = train(config(straight), progress=False)
        stopped = train(config(split), progress=False, stop_after_steps=6)
        resumed = train(config(split), progress=False, resume="")
    assert whole.report["steps"] == 12 and stopped.report["stopped_at_step"] == 6
    assert resumed.report["steps"] == 12
    last_straight, last_split = checkpoint_dirs(straight)[-1], checkpoint_dirs(split)[-1]
    assert last_straight.name == last_split.name
    for name in (TEACHER_NAME, STUDENT_NAME):
        assert largest_difference(last_straight / name, last_split / name) <= 1e-6, name
