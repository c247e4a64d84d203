"""Two ranks as two processes: disjoint training samples and each val sample exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RANK_SCRIPT = """
import json, sys
from pipelines import DataConfig, build_loaders
shard_dir, rank, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = DataConfig(batch_size=32, labeled_per_batch=8, student_aug="digits-train", teacher_aug="digits-train",
                 eval_aug="digits-eval", workers=1, shuffle_buffer=32, eval_batch_size=100)
loaders = build_loaders(shard_dir, cfg, rank=rank, world_size=2, backend=backend, with_keys=True)
train = [b["key"][8:] for b in loaders.train]
val = [(b.get("key", []), int(b["valid"].sum())) for b in loaders.val]
print(json.dumps({"len": len(loaders.train), "batches": len(train), "unlabeled": [k for ks in train for k in ks],
                  "val_batches": len(val), "val_valid": sum(v for _, v in val),
                  "val": [k for ks, _ in val for k in ks]}))
"""


def run_ranks(shard_dir: Path, backend: str) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(shard_dir), str(rank), backend],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_two_torch_ranks_read_disjoint_samples(digits_shards, digits_content):
    first, second = run_ranks(digits_shards, "torch")
    # reading by sample: 1208 unlabeled -> 604 per rank whatever the shards, 604 // 24 = 25 batches each
    assert first["len"] == second["len"] == first["batches"] == second["batches"] == 604 // 24
    assert not set(first["unlabeled"]) & set(second["unlabeled"])
    assert len(set(first["unlabeled"])) == len(set(second["unlabeled"])) == 25 * 24
    # val: each sample once across ranks, the same batch count on both ranks (padding rows are invalid)
    assert first["val_batches"] == second["val_batches"]
    assert not set(first["val"]) & set(second["val"])
    assert sorted(first["val"] + second["val"]) == sorted(digits_content["val"])
    assert first["val_valid"] + second["val_valid"] == len(digits_content["val"])
    assert not set(first["unlabeled"]) & set(second["unlabeled"])
    assert len(set(first["unlabeled"])) == len(first["unlabeled"]) == first["len"] * 24
    assert sorted(first["val"] + second["val"]) == sorted(digits_content["val"])


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_two_dali_ranks_split_the_epoch_and_val(digits_shards, digits_content):
    first, second = run_ranks(digits_shards, "dali")
    # DALI shards by sample: 1208 unlabeled -> 604 per rank, 604 // 24 = 25 batches each
    total = len(digits_content["train-unlabeled"])
    assert first["len"] == second["len"] == first["batches"] == (total // 2) // 24
    assert first["val_batches"] == second["val_batches"]
    assert first["val_valid"] + second["val_valid"] == len(digits_content["val"])
    assert not set(first["unlabeled"]) & set(second["unlabeled"])
    assert len(set(first["unlabeled"])) == len(first["unlabeled"]) == first["len"] * 24
    assert sorted(first["val"] + second["val"]) == sorted(digits_content["val"])
