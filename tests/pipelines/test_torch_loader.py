"""The PyTorch backend end to end on the packed digits and photo sets."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipelines import build_loaders, normalize, resolve_backend
from pipelines.config import DataConfig
from pipelines.errors import PipelineError


def decode_rgb(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def epoch_batches(loaders):
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in loaders.train]


def test_batches_hold_L_labeled_then_U_unlabeled_rows_from_the_right_images(digits_shards, digits_content, digits_config):
    cfg = digits_config(student_aug="none", teacher_aug="none")
    loaders = build_loaders(digits_shards, cfg, with_keys=True)
    assert loaders.backend == "torch" and loaders.num_classes == 10 and loaders.class_names[3] == "3"
    labeled, unlabeled = digits_content["train-labeled"], digits_content["train-unlabeled"]
    for index, batch in enumerate(loaders.train):
        keys, labels = batch["key"], batch["label"]
        assert batch["student"].shape == (64, 3, 32, 32) and batch["student"].dtype == torch.uint8
        assert all(k in labeled for k in keys[:16]) and all(k in unlabeled for k in keys[16:])
        assert labels[:16].tolist() == [labeled[k][0] for k in keys[:16]]
        assert labels[16:].tolist() == [-1] * 48
        # no augmentation: both views are exactly the decoded image of the row's key
        for row in (0, 15, 16, 63):
            source = labeled if row < 16 else unlabeled
            expected = torch.from_numpy(decode_rgb(source[keys[row]][1]).transpose(2, 0, 1).copy())
            assert torch.equal(batch["student"][row], expected) and torch.equal(batch["teacher"][row], expected)
        if index == 3:
            break


def test_views_come_from_one_image_and_differ_when_augmented(digits_shards, digits_config):
    cfg = digits_config(student_aug="none", teacher_aug="cifar-train", workers=1)
    batch = next(iter(build_loaders(digits_shards, cfg).train))
    for row in range(8):
        student = batch["student"][row].permute(1, 2, 0).numpy()
        teacher = batch["teacher"][row].permute(1, 2, 0).numpy()
        # the teacher view must be some shift (|d| <= 4, reflected border) and/or flip of the student view
        candidates = []
        for flip in (False, True):
            base = student[:, ::-1] if flip else student
            for dx in range(-4, 5):
                for dy in range(-4, 5):
                    shifted = cv2.warpAffine(np.ascontiguousarray(base), np.float64([[1, 0, dx], [0, 1, dy]]), (32, 32),
                                             borderMode=cv2.BORDER_REFLECT_101)
                    candidates.append(np.abs(shifted.astype(int) - teacher).max())
        assert min(candidates) == 0
    augmented = next(iter(build_loaders(digits_shards, digits_config(workers=1)).train))
    differ = [not torch.equal(s, t) for s, t in zip(augmented["student"], augmented["teacher"], strict=True)]
    assert sum(differ) >= 60


def test_one_epoch_sees_each_unlabeled_sample_once_up_to_partial_batches(digits_shards, digits_content, digits_config):
    loaders = build_loaders(digits_shards, digits_config(), with_keys=True)
    batches = epoch_batches(loaders)
    assert len(batches) == len(loaders.train)
    keys = [k for b in batches for k in b["key"][16:]]
    assert len(keys) == len(set(keys)) == len(loaders.train) * 48
    # each worker reads 1208 / 2 = 604 samples: its last partial batch, 604 % 48, is left out
    assert len(digits_content["train-unlabeled"]) - len(keys) == 2 * (604 % 48)
    assert loaders.train.epoch == 1 and loaders.train.skipped == 0


def test_epochs_reshuffle_and_a_seed_repeats_exactly(digits_shards, digits_config):
    first = build_loaders(digits_shards, digits_config(workers=1), with_keys=True)
    second = build_loaders(digits_shards, digits_config(workers=1), with_keys=True)
    a, b = next(iter(first.train)), next(iter(second.train))
    assert a["key"] == b["key"] and torch.equal(a["student"], b["student"])
    first.set_epoch(1)
    assert next(iter(first.train))["key"] != a["key"]


def test_resume_neither_repeats_nor_skips(digits_shards, digits_config):
    full = epoch_batches(build_loaders(digits_shards, digits_config(), with_keys=True))
    loaders = build_loaders(digits_shards, digits_config(), with_keys=True)
    head = []
    for batch in loaders.train:
        head.append(batch)
        if len(head) == 7:
            break
    state = loaders.state_dict()
    assert state["train"]["epoch"] == 0 and sum(state["train"]["worker_batches"]) == 7
    resumed = build_loaders(digits_shards, digits_config(), with_keys=True)
    resumed.load_state_dict(state)
    tail = epoch_batches(resumed)
    assert len(head) + len(tail) == len(full)
    by_keys = {tuple(b["key"]): b for b in full}
    assert sorted(tuple(b["key"]) for b in head + tail) == sorted(by_keys)
    sample = tail[0]  # the same rows get the same augmented views as in the uninterrupted run
    assert torch.equal(sample["student"], by_keys[tuple(sample["key"])]["student"])
    assert resumed.train.epoch == 1


def test_repeated_labeled_draws_get_fresh_views_and_a_resume_replays_them(digits_shards, digits_config):
    full = epoch_batches(build_loaders(digits_shards, digits_config(), with_keys=True))
    draws: dict[str, list[tuple[bytes, bytes]]] = {}
    for batch in full:
        for row, key in enumerate(batch["key"][:16]):
            draws.setdefault(key, []).append((batch["student"][row].numpy().tobytes(),
                                              batch["teacher"][row].numpy().tobytes()))
    # 24 batches x 16 labeled rows = 384 draws of the 50 labeled images: each drawn ~8 times
    assert len(draws) == 50 and sum(len(d) for d in draws.values()) == 24 * 16
    for key, views in draws.items():
        assert len(views) >= 2
        assert len({student for student, _ in views}) == len(views), key  # a new student view every draw
        assert len({teacher for _, teacher in views}) == len(views), key
        assert all(student != teacher for student, teacher in views), key
    loaders = build_loaders(digits_shards, digits_config(), with_keys=True)
    for done, _ in enumerate(loaders.train, 1):
        if done == 9:
            break
    resumed = build_loaders(digits_shards, digits_config(), with_keys=True)
    resumed.load_state_dict(loaders.state_dict())
    tail = epoch_batches(resumed)
    by_keys = {tuple(b["key"]): b for b in full}
    assert len(tail) == len(full) - 9
    for batch in tail:  # the same positions give the same views, labeled rows included
        reference = by_keys[tuple(batch["key"])]
        assert torch.equal(batch["student"], reference["student"]) and torch.equal(batch["teacher"], reference["teacher"])


def _corrupt_unlabeled_images(shards, every: int) -> int:
    """Zero every `every`-th unlabeled JPEG in place (same length: tars and indexes stay valid)."""
    from shard_tools.format import index_name, parse_index
    from shard_tools.manifest import read_manifest

    count = 0
    for name in read_manifest(shards).split("train-unlabeled").shards:
        samples = parse_index(open(index_name(str(shards / name))).read())
        with open(shards / name, "r+b") as handle:
            for _, members in samples[::every]:
                offset, size = members["jpg"]
                handle.seek(offset)
                handle.write(b"\0" * size)
                count += 1
    return count


@pytest.mark.timeout(120)
def test_resume_is_exact_after_undecodable_images_were_skipped(damaged_digits, digits_config):
    shards, _, _ = damaged_digits
    assert _corrupt_unlabeled_images(shards, every=97) == 14
    full = epoch_batches(build_loaders(shards, digits_config(), with_keys=True))
    loaders = build_loaders(shards, digits_config(), with_keys=True)
    for done, _ in enumerate(loaders.train, 1):
        if done == 12:
            break
    assert loaders.train.skipped > 0  # the streams already drew past undecodable images
    resumed = build_loaders(shards, digits_config(), with_keys=True)
    resumed.load_state_dict(loaders.state_dict())
    tail = epoch_batches(resumed)
    assert sorted(tuple(b["key"]) for b in tail) == sorted(tuple(b["key"]) for b in full[12:])
    by_keys = {tuple(b["key"]): b for b in full}
    assert all(torch.equal(b["student"], by_keys[tuple(b["key"])]["student"]) for b in tail)


def test_supervised_batches_when_U_is_zero(digits_shards, digits_content, digits_config):
    cfg = digits_config(batch_size=10, labeled_per_batch=10, workers=1)
    loaders = build_loaders(digits_shards, cfg, with_keys=True)
    assert len(loaders.train) == 50 // 10
    batches = epoch_batches(loaders)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(digits_content["train-labeled"])
    assert all((b["label"] >= 0).all() for b in batches)


def test_val_yields_each_sample_once_with_its_label(digits_shards, digits_content, digits_config):
    loaders = build_loaders(digits_shards, digits_config(), with_keys=True)
    seen = {}
    for batch in loaders.val:
        assert batch["image"].shape == (128, 3, 32, 32)
        valid = batch["valid"]
        assert batch["label"][~valid].eq(-1).all()
        for key, label in zip(batch["key"], batch["label"][valid].tolist(), strict=True):
            seen[key] = label
        assert len(batch["key"]) == int(valid.sum())
    assert seen == {k: v[0] for k, v in digits_content["val"].items()}


def test_photo_set_imagenet_views(photo_shards):
    cfg = DataConfig(batch_size=8, labeled_per_batch=4, student_aug="imagenet-train", teacher_aug="imagenet-train",
                     eval_aug="imagenet-eval", workers=1, shuffle_buffer=16, eval_batch_size=8)
    loaders = build_loaders(photo_shards, cfg)
    assert len(loaders.train) == 48 // 4
    batch = next(iter(loaders.train))
    assert batch["student"].shape == batch["teacher"].shape == (8, 3, 224, 224)
    assert not torch.equal(batch["student"], batch["teacher"])
    assert next(iter(loaders.val))["image"].shape == (8, 3, 224, 224)


def test_bad_inputs_raise_pipeline_error(tmp_path, digits_shards, damaged_digits, digits_config):
    with pytest.raises(PipelineError, match="no such shard set"):
        build_loaders(tmp_path / "nowhere", digits_config())
    shards, _, remove_index = damaged_digits
    removed = remove_index()
    for backend in ("dali", "torch"):  # both backends locate samples through the index
        with pytest.raises(PipelineError, match="DALI index missing"):
            build_loaders(shards, digits_config(), backend=backend)
    (shards / removed.name.replace(".idx", ".tar")).unlink()
    with pytest.raises(PipelineError, match="shard listed in the manifest is missing"):
        build_loaders(shards, digits_config(), backend="torch")
    with pytest.raises(PipelineError, match="labeled_per_batch"):
        build_loaders(shards, digits_config(labeled_per_batch=0))
    with pytest.raises(PipelineError, match="no full training batch"):
        build_loaders(digits_shards, digits_config(batch_size=2000, labeled_per_batch=10))


@pytest.mark.parametrize("kind", ["zeros", "truncated"])
@pytest.mark.timeout(120)
def test_a_corrupt_image_is_a_counted_skip(damaged_digits, digits_config, kind):
    shards, corrupt_one_image, _ = damaged_digits
    bad_key = corrupt_one_image(kind)
    loaders = build_loaders(shards, digits_config(), with_keys=True)
    batches = epoch_batches(loaders)  # the skip is also warned about, from the worker process
    assert len(batches) == len(loaders.train)  # every batch still full
    assert loaders.train.skipped == 1
    assert bad_key not in {k for b in batches for k in b["key"]}


def test_normalize_is_the_reference_formula():
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(normalize(images, mean, std), expected, atol=1e-5)
    out = normalize(images, mean, std, dtype=torch.bfloat16, channels_last=True)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)


def test_auto_backend_is_torch_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto") == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto") == "dali"
    with pytest.raises(PipelineError):
        resolve_backend("tensorflow")
