"""The paper presets run end to end: cifar10-4000's model and recipe on a crafted CIFAR-10 binary archive."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mt_scale.config import load_config
from mt_scale.train import train
from shard_tools.pack import pack

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _records(labels: list[int], rng: np.random.Generator) -> bytes:
    # one record: the label byte, then the R, G and B 32x32 planes
    return b"".join(bytes([label]) + rng.integers(0, 256, 3072, dtype=np.uint8).tobytes() for label in labels)


def _cifar_binary_archive(path: Path, per_batch: int, test: int) -> Path:
    rng = np.random.default_rng(0)
    members = {"cifar-10-batches-bin/batches.meta.txt": ("\n".join(CLASSES) + "\n").encode()}
    for batch in range(5):
        labels = [(per_batch * batch + i) % 10 for i in range(per_batch)]
        members[f"cifar-10-batches-bin/data_batch_{batch + 1}.bin"] = _records(labels, rng)
    members["cifar-10-batches-bin/test_batch.bin"] = _records([i % 10 for i in range(test)], rng)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return path


@pytest.mark.slow
def test_cifar10_4000_runs_three_optimizer_steps_of_shakeshake26_on_a_cifar_archive(tmp_path: Path):
    archive = _cifar_binary_archive(tmp_path / "cifar-10-binary.tar.gz", per_batch=8, test=10)
    shards = tmp_path / "shards"
    summary = pack(archive, shards, labels_per_class=2, workers=1, progress=False)
    assert summary.counts == {"train-labeled": 20, "train-unlabeled": 20, "val": 10}
    # The preset's model, losses, schedules and augmentation; a global batch of 8 (2 labeled) in
    # micro-batches of at most 4 rows, so one optimizer step accumulates two micro-batches; the 20
    # unlabeled images give 6 micro-batches of 3 unlabeled rows: one epoch is 3 optimizer steps.
    cfg = load_config("cifar10-4000", overrides=[
        f"run.shards={shards}", f"run.output_dir={tmp_path / 'run'}", "data.batch_size=8",
        "data.labeled_per_batch=2", "run.max_device_batch=4", "data.workers=0", "data.eval_batch_size=10",
        "run.epochs=1", "optim.lr_rampdown_epochs=1", "run.checkpoint_every_epochs=0",
    ])
    assert cfg.model.name == "cifar_shakeshake26" and cfg.mt.ema_decay == 0.99
    result = train(cfg, progress=False)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 3
    assert report["batch"] == {"world_size": 1, "grad_accum_steps": 2, "device_batch": 4, "labeled_per_rank": [1],
                               "global_batch": 8, "global_labeled": 2, "lr": 0.2, "device_limit": 4,
                               "batchnorm_rows": 4}
    assert report["val_count"] == 10
    assert 0.0 <= report["final"]["teacher_top1_error"] <= 1.0
    assert sum(p.numel() for p in result.teacher.parameters()) > 26_000_000
