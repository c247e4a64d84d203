"""The DALI backend in CPU-only mode (device_id=None): the torch backend's batches, exact resume, skips."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import types

import pytest
import torch

from pipelines import DataConfig, build_loaders
from pipelines.errors import PipelineError

pytest.importorskip("nvidia.dali")


def take(loader, count=None):
    batches = []
    for batch in loader:
        batches.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
        if len(batches) == count:
            break
    return batches


def assert_same_views(first: list[dict], second: list[dict], names=("student", "teacher")) -> None:
    """Same keys and labels in the same order and identical views, batch by batch."""
    assert len(first) == len(second) > 0
    for a, b in zip(first, second, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["label"], b["label"])
        assert all(torch.equal(a[name], b[name]) for name in names)


def assert_views_close(torch_batches: list[dict], dali_batches: list[dict]) -> None:
    """The torch backend's keys, labels and views: the same draws rendered by OpenCV and by DALI."""
    assert [b["key"] for b in dali_batches] == [b["key"] for b in torch_batches]
    for ours, theirs in zip(dali_batches, torch_batches, strict=True):
        assert torch.equal(ours["label"], theirs["label"])
        for name in ("student", "teacher"):
            difference = (ours[name].float() - theirs[name].float()).abs()
            assert difference.mean() < 0.05 and difference.max() <= 2, (name, ours["key"][:2])


@pytest.fixture(scope="module")
def dali_run(digits_shards, digits_config) -> dict:
    """The default digits loaders' first two DALI epochs, read once for the tests that compare with them."""
    loaders = build_loaders(digits_shards, digits_config(), backend="dali", with_keys=True)
    first = take(loaders.train)
    run = {"backend": loaders.backend, "length": len(loaders.train), "epoch": loaders.train.epoch,
           "skipped": loaders.train.skipped, "first": first, "both": first + take(loaders.train)}
    del loaders  # its readers go: the next loaders built here fork theirs rather than spawn them
    return run


@pytest.mark.timeout(300)
def test_dali_batches_hold_labeled_then_unlabeled_rows(dali_run, digits_content):
    # two readers, as the torch backend's two workers: 604 unlabeled samples each, 12 batches of 48
    assert dali_run["backend"] == "dali" and dali_run["length"] == 24
    labeled, unlabeled = digits_content["train-labeled"], digits_content["train-unlabeled"]
    batches = dali_run["first"]
    for batch in batches:
        keys = batch["key"]
        assert batch["student"].shape == batch["teacher"].shape == (64, 3, 32, 32)
        assert batch["student"].dtype == torch.uint8
        assert all(k in labeled for k in keys[:16]) and all(k in unlabeled for k in keys[16:])
        assert batch["label"][:16].tolist() == [labeled[k][0] for k in keys[:16]]
        assert batch["label"][16:].tolist() == [-1] * 48
        assert sum(not torch.equal(s, t) for s, t in zip(batch["student"], batch["teacher"], strict=True)) >= 60
    seen = [k for b in batches for k in b["key"][16:]]
    assert len(seen) == len(set(seen)) == 24 * 48  # each reader leaves out its last partial batch only
    assert dali_run["epoch"] == 1 and dali_run["skipped"] == 0


@pytest.mark.timeout(300)
def test_dali_views_are_equal_without_augmentation(digits_shards, digits_config):
    loaders = build_loaders(digits_shards, digits_config(student_aug="none", teacher_aug="none"), backend="dali")
    batch = take(loaders.train, 1)[0]
    assert torch.equal(batch["student"], batch["teacher"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("rank", "world_size", "workers"), [(0, 1, 2), (1, 2, 1),
                                                        pytest.param(0, 1, 3, marks=pytest.mark.slow)])
def test_dali_gives_the_torch_backend_batches(digits_shards, digits_config, rank, world_size, workers):
    cfg = digits_config(workers=workers, seed=5)
    runs = {}
    for backend in ("torch", "dali"):
        loaders = build_loaders(digits_shards, cfg, rank=rank, world_size=world_size, backend=backend,
                                with_keys=True)
        runs[backend] = take(loaders.train) + take(loaders.train), take(loaders.val)  # two epochs and val
    (torch_train, torch_val), (dali_train, dali_val) = runs["torch"], runs["dali"]
    assert_views_close(torch_train, dali_train)
    assert [b["key"] for b in dali_val] == [b["key"] for b in torch_val]
    for ours, theirs in zip(dali_val, torch_val, strict=True):
        assert torch.equal(ours["valid"], theirs["valid"]) and torch.equal(ours["label"], theirs["label"])
        assert (ours["image"].float() - theirs["image"].float()).abs().max() <= 1


@pytest.mark.timeout(300)
def test_two_dali_ranks_cover_the_epoch_once(digits_shards, digits_content, digits_config):
    lengths, unlabeled, val = [], [], []
    for rank in range(2):  # one rank after the other, as two processes would read
        loaders = build_loaders(digits_shards, digits_config(), rank=rank, world_size=2, backend="dali",
                                with_keys=True)
        lengths.append(len(loaders.train))
        unlabeled.append([k for b in take(loaders.train) for k in b["key"][16:]])
        val.append([k for b in take(loaders.val) for k in b["key"]])
        del loaders
    assert lengths == [2 * (302 // 48)] * 2  # 604 per rank, 302 per reader
    assert not set(unlabeled[0]) & set(unlabeled[1])
    assert len(set(unlabeled[0] + unlabeled[1])) == 2 * 12 * 48
    assert len(digits_content["train-unlabeled"]) - 2 * 12 * 48 == 4 * (302 % 48)  # partial batches only
    assert sorted(val[0] + val[1]) == sorted(digits_content["val"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", [6, pytest.param(7, marks=pytest.mark.slow), pytest.param(24 + 5, marks=pytest.mark.slow)])
def test_dali_resume_equals_an_unbroken_run(dali_run, digits_shards, digits_config, stop):
    full = dali_run["both"]
    loaders = build_loaders(digits_shards, digits_config(), backend="dali", with_keys=True)
    head = take(loaders.train, stop) if stop < 24 else take(loaders.train) + take(loaders.train, stop - 24)
    state = loaders.state_dict()
    del loaders  # stopped, as a pre-empted run is
    resumed = build_loaders(digits_shards, digits_config(), backend="dali", with_keys=True)
    resumed.load_state_dict(state)
    tail = take(resumed.train)
    if stop < 24:
        tail += take(resumed.train)
    assert len(head) + len(tail) == len(full) == 48
    if stop % 2 == 0:  # both readers had delivered alike: the round robin goes on exactly
        assert_same_views(head + tail, full)
    else:  # as the torch backend: the same batches; within a round the readers' order may differ
        by_keys = {tuple(b["key"]): b for b in full}
        assert sorted(tuple(b["key"]) for b in head + tail) == sorted(by_keys)
        assert_same_views(tail, [by_keys[tuple(b["key"])] for b in tail])
    assert resumed.train.epoch == 2


@pytest.mark.timeout(300)
def test_dali_skips_a_damaged_image_as_the_torch_backend_does(damaged_digits, digits_config):
    shards, corrupt_one_image, _ = damaged_digits
    bad_keys = {corrupt_one_image("zeros"), corrupt_one_image("truncated")}
    runs = {}
    for backend in ("torch", "dali"):
        loaders = build_loaders(shards, digits_config(), backend=backend, with_keys=True)
        runs[backend] = take(loaders.train), take(loaders.val), loaders.train.skipped
    assert runs["dali"][2] == runs["torch"][2] >= 1
    assert_views_close(runs["torch"][0], runs["dali"][0])
    assert not bad_keys & {k for b in runs["dali"][0] for k in b["key"]}
    assert [b["key"] for b in runs["dali"][1]] == [b["key"] for b in runs["torch"][1]]


def _scramble_huffman_tables(shards, split: str) -> str:
    """Fill the Huffman table segment of one image of `split` with 0xFF bytes in place: its markers and
    size still read, but no decoder can decode it. Returns its key."""
    from shard_tools.format import index_name, parse_index
    from shard_tools.manifest import read_manifest

    shard = shards / read_manifest(shards).split(split).shards[0]
    key, members = parse_index(open(index_name(str(shard))).read())[3]
    offset, size = members["jpg"]
    with open(shard, "r+b") as handle:
        handle.seek(offset)
        data = bytearray(handle.read(size))
        table = data.index(b"\xff\xc4")
        length = int.from_bytes(data[table + 2:table + 4], "big")
        data[table + 4:table + 2 + length] = b"\xff" * (length - 2)
        handle.seek(offset)
        handle.write(data)
    return key


@pytest.mark.timeout(120)
def test_an_image_dali_cannot_decode_is_one_line(damaged_digits, digits_config):
    shards, _, _ = damaged_digits
    _scramble_huffman_tables(shards, "val")
    readers_before = set(multiprocessing.active_children())
    loaders = build_loaders(shards, digits_config(), backend="dali")
    with pytest.raises(PipelineError) as error:
        take(loaders.val)
    message = str(error.value)
    assert "\n" not in message and message.startswith("DALI failed on a batch of val: Failed to decode"), message
    assert "mt-shard verify --decode" in message and "data.backend=torch" in message
    assert not [p for p in multiprocessing.active_children() if p not in readers_before and p.is_alive()]


@pytest.mark.timeout(300)
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


@pytest.mark.timeout(300)
def test_photo_views_follow_the_torch_backend(photo_shards):
    # imagenet-train: rotation, random-resized crop, flip and colour jitter from the same draws
    cfg = DataConfig(batch_size=8, labeled_per_batch=4, student_aug="imagenet-train", teacher_aug="imagenet-train",
                     eval_aug="imagenet-eval", workers=1, shuffle_buffer=16, eval_batch_size=8)
    runs = {backend: take(build_loaders(photo_shards, cfg, backend=backend, with_keys=True).train, 2)
            for backend in ("torch", "dali")}
    assert [b["key"] for b in runs["dali"]] == [b["key"] for b in runs["torch"]]
    for ours, theirs in zip(runs["dali"], runs["torch"], strict=True):
        for name in ("student", "teacher"):
            difference = (ours[name].float() - theirs[name].float()).abs()
            # OpenCV decodes at a reduced DCT scale where a view shrinks the image; DALI at full size
            assert difference.mean() < 4.0, name


BOTH_BACKENDS = """
import sys
from pipelines import DataConfig, build_loaders
from pipelines.errors import PipelineError

cfg = DataConfig(batch_size=64, labeled_per_batch=16, student_aug="digits-train", teacher_aug="digits-train",
                 eval_aug="digits-eval", workers=2, shuffle_buffer=64, eval_batch_size=128)
for backend in sys.argv[2].split(","):
    loaders = build_loaders(sys.argv[1], cfg, backend=backend)
    batches = [batch["label"][:16].min().item() for _, batch in zip(range(5), loaders.train, strict=False)]
    scored = sum(int(batch["valid"].sum()) for batch in loaders.val)
    print(backend, len(loaders.train), len(batches), scored, flush=True)
"""


@pytest.mark.slow  # a subprocess each
@pytest.mark.parametrize("order", ["dali,torch", "torch,dali"])
@pytest.mark.timeout(300)
def test_both_backends_in_one_process_in_either_order(digits_shards, digits_content, order):
    # a subprocess of its own, so that a crash (DALI's native state in a forked worker) is a failure
    result = subprocess.run([sys.executable, "-c", BOTH_BACKENDS, str(digits_shards), order],
                            capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-2000:]
    val = len(digits_content["val"])
    # both: 2 readers of 604 unlabeled -> 2 x 12 batches of 48
    assert result.stdout.split("\n")[:2] == [f"{name} 24 5 {val}" for name in order.split(",")]


@pytest.mark.slow  # spawned readers: an interpreter each
@pytest.mark.timeout(300)
def test_spawned_readers_give_the_forked_readers_batches(digits_shards, digits_config, monkeypatch, tmp_path):
    # after CUDA is initialised DALI must spawn its Python workers: the feeds travel pickled
    forked = take(build_loaders(digits_shards, digits_config(), backend="dali", with_keys=True).train, 3)
    monkeypatch.setattr("pipelines.dali.start_method", lambda: "spawn")
    # a trainer's main script, which a spawned child would run again (mt-train's imports torch and timm)
    marker = tmp_path / "main-ran"
    script = tmp_path / "trainer.py"
    script.write_text(f"open({str(marker)!r}, 'a').write('ran\\n')\n")
    trainer = types.ModuleType("__main__")
    trainer.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", trainer)
    spawned = take(build_loaders(digits_shards, digits_config(), backend="dali", with_keys=True).train, 3)
    assert_same_views(forked, spawned)
    assert not marker.exists()  # the readers started without running it


@pytest.mark.timeout(300)
def test_readers_outlive_a_preemption_signal_and_end_with_their_pipelines(dali_run, digits_shards, digits_config):
    # SIGTERM reaches the whole process group: mt-train handles it (a flag, then a checkpoint), and the
    # readers go on, so the epoch is the unbroken one; closing the pipelines ends them
    full = dali_run["first"]
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        before = set(multiprocessing.active_children())
        loaders = build_loaders(digits_shards, digits_config(), backend="dali", with_keys=True)
        batches = iter(loaders.train)
        got = take(batches, 3)
        readers = [p for p in multiprocessing.active_children() if p not in before]
        assert len(readers) == 2
        for reader in readers:
            os.kill(reader.pid, signal.SIGTERM)
        got += take(batches)
        assert all(reader.is_alive() for reader in readers)
        assert_same_views(got, full)
        del batches, loaders
        gc.collect()  # the pipelines go, and with them their Python workers
        for reader in readers:
            reader.join(timeout=60)  # their exit, not a guess at how long it takes
        assert not [reader for reader in readers if reader.is_alive()]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.timeout(120)
def test_build_pipeline_cycles_over_fewer_images_than_a_batch(photo_shards):
    from pipelines.augment import get_spec
    from pipelines.dali import build_pipeline
    from shard_tools.manifest import read_manifest

    shards = [str(photo_shards / name) for name in read_manifest(photo_shards).split("val").shards]
    spec = get_spec("imagenet-train")
    pipe = build_pipeline(shards, (spec,), 24, shard_id=0, num_shards=1, shuffle_buffer=0, seed=7, threads=1,
                          device_id=None)
    keys = []
    for _ in range(2):
        views, _, key, _ = pipe.run()
        assert views.as_array().shape == (24, 3, 224, 224)
        keys += [bytes(key.at(i)).decode() for i in range(len(key))]
    assert len(set(keys)) == 16 and len(keys) == 48  # the 16 val images, pass after pass


@pytest.mark.timeout(120)
def test_images_over_the_pixel_cap_are_skipped_as_by_the_torch_backend(digits_shards, digits_config):
    messages = {}
    for backend in ("torch", "dali"):  # every digit is 32 x 32 = 1,024 pixels
        with pytest.raises(PipelineError) as error:
            take(build_loaders(digits_shards, digits_config(max_pixels=1023), backend=backend).train, 1)
        messages[backend] = str(error.value)
    assert messages["dali"] == messages["torch"]
    assert "\n" not in messages["dali"] and "images this reader holds decodes" in messages["dali"]
