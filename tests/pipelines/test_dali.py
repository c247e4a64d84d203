"""The DALI backend in CPU-only mode (device_id=None): structure, epochs, resume, agreement with torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pipelines import DataConfig, build_loaders
from pipelines.errors import PipelineError

pytest.importorskip("nvidia.dali")


def take(loader, count):
    batches = []
    for batch in loader:
        batches.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
        if len(batches) == count:
            break
    return batches


def test_dali_batches_hold_labeled_then_unlabeled_rows(digits_shards, digits_content, digits_config):
    loaders = build_loaders(digits_shards, digits_config(), backend="dali", with_keys=True)
    assert loaders.backend == "dali" and len(loaders.train) == 1208 // 48
    labeled, unlabeled = digits_content["train-labeled"], digits_content["train-unlabeled"]
    for batch in take(loaders.train, 3):
        keys = batch["key"]
        assert batch["student"].shape == batch["teacher"].shape == (64, 3, 32, 32)
        assert batch["student"].dtype == torch.uint8
        assert all(k in labeled for k in keys[:16]) and all(k in unlabeled for k in keys[16:])
        assert batch["label"][:16].tolist() == [labeled[k][0] for k in keys[:16]]
        assert batch["label"][16:].tolist() == [-1] * 48
        assert sum(not torch.equal(s, t) for s, t in zip(batch["student"], batch["teacher"], strict=True)) >= 60


def test_dali_views_are_equal_without_augmentation(digits_shards, digits_config):
    loaders = build_loaders(digits_shards, digits_config(student_aug="none", teacher_aug="none"), backend="dali")
    batch = take(loaders.train, 1)[0]
    assert torch.equal(batch["student"], batch["teacher"])


def test_dali_epochs_read_the_rank_share_as_one_stream(digits_shards, digits_config):
    loaders = build_loaders(digits_shards, digits_config(batch_size=208, labeled_per_batch=8), backend="dali",
                            with_keys=True)
    assert len(loaders.train) == 1208 // 200
    first = [k for b in loaders.train for k in b["key"][8:]]
    assert len(first) == len(set(first)) == 6 * 200  # the first epoch is within one reader pass
    second = [k for b in loaders.train for k in b["key"][8:]]
    # the shuffle buffer spans the pass boundary: only a few samples may repeat (documented rule)
    assert len(second) == 1200 and len(set(second)) >= 1200 - 64
    assert loaders.train.epoch == 2


def test_dali_resume_continues_the_reader_state(digits_shards, digits_config):
    loaders = build_loaders(digits_shards, digits_config(), backend="dali", with_keys=True)
    iterator = iter(loaders.train)
    for _ in range(3):
        next(iterator)
    state = loaders.state_dict()
    expected = next(iterator)
    resumed = build_loaders(digits_shards, digits_config(), backend="dali", with_keys=True)
    resumed.load_state_dict(state)
    got = next(iter(resumed.train))
    assert got["key"] == expected["key"]
    assert torch.equal(got["student"], expected["student"])  # random draws are restored too
    assert resumed.train.state_dict()["batches_done"] == 4


@pytest.mark.parametrize("preset", ["imagenet-eval", "digits-eval"])
def test_dali_and_torch_eval_views_agree(photo_shards, digits_shards, preset):
    shards = photo_shards if preset == "imagenet-eval" else digits_shards
    cfg = DataConfig(batch_size=8, labeled_per_batch=4, student_aug="none", teacher_aug="none", eval_aug=preset,
                     workers=1, eval_batch_size=16)
    views = {}
    for backend in ("torch", "dali"):
        batch = take(build_loaders(shards, cfg, backend=backend, with_keys=True).val, 1)[0]
        views[backend] = dict(zip(batch["key"], batch["image"][batch["valid"]], strict=True))
    assert views["torch"].keys() == views["dali"].keys() and len(views["torch"]) == 16
    for key, image in views["torch"].items():
        difference = (image.float() - views["dali"][key].float()).abs()
        assert difference.mean() < 1.0 and torch.quantile(difference.flatten(), 0.99) <= 8, key


@pytest.mark.parametrize("kind", ["zeros", "truncated"])
@pytest.mark.timeout(120)
def test_dali_refuses_a_shard_with_a_corrupt_image(damaged_digits, digits_config, kind):
    shards, corrupt_one_image, _ = damaged_digits
    bad_key = corrupt_one_image(kind)
    with pytest.raises(PipelineError, match=f"{bad_key}.jpg is not a complete JPEG"):
        build_loaders(shards, digits_config(), backend="dali")


BOTH_BACKENDS = """
import sys
from pipelines import DataConfig, build_loaders

cfg = DataConfig(batch_size=64, labeled_per_batch=16, student_aug="digits-train", teacher_aug="digits-train",
                 eval_aug="digits-eval", workers=2, shuffle_buffer=64, eval_batch_size=128)
for backend in sys.argv[2].split(","):
    loaders = build_loaders(sys.argv[1], cfg, backend=backend)
    batches = [batch["label"][:16].min().item() for _, batch in zip(range(5), loaders.train, strict=False)]
    scored = sum(int(batch["valid"].sum()) for batch in loaders.val)
    print(backend, len(loaders.train), len(batches), scored, flush=True)
"""


@pytest.mark.parametrize("order", ["dali,torch", "torch,dali"])
@pytest.mark.timeout(300)
def test_both_backends_in_one_process_in_either_order(digits_shards, digits_content, order):
    # a subprocess of its own, so that a crash (DALI's native state in a forked worker) is a failure
    result = subprocess.run([sys.executable, "-c", BOTH_BACKENDS, str(digits_shards), order],
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-2000:]
    val = len(digits_content["val"])
    # torch: 2 workers of 604 unlabeled -> 2 x 12 batches of 48; DALI: one reader per rank, 1208 // 48
    expected = {"torch": f"torch 24 5 {val}", "dali": f"dali 25 5 {val}"}
    assert result.stdout.split("\n")[:2] == [expected[name] for name in order.split(",")]
