"""Reading by sample: who reads what (ranks x workers, any shard layout), val once, and damaged sets."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

import pipelines.reading as reading
from pipelines import DataConfig, PipelineError, build_loaders
from pipelines.reading import Split, draws, open_set, shuffled
from shard_tools.format import TRAIN_UNLABELED, build_index, encode_label, index_name
from shard_tools.manifest import read_manifest
from shard_tools.pack import pack

# the module's packed layouts are built once: one pytest-xdist worker runs this module
pytestmark = pytest.mark.xdist_group("reading_layouts")


@pytest.fixture(scope="module", params=["one_shard", "uneven"])
def layout(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits with 70 labels per class: 700 labeled, 558 unlabeled, 539 val samples, packed with one
    shard per split or with 200-sample shards (unlabeled 200 + 200 + 158, val 200 + 200 + 139)."""
    out = tmp_path_factory.mktemp(f"digits_{request.param}") / "shards"
    shard_size = 2000 if request.param == "one_shard" else 200
    pack("digits", out, labels_per_class=70, seed=0, shard_size=shard_size, workers=1, progress=False)
    return out


def sample_order(shard_dir: Path, split: str) -> list[str]:
    """A split's keys in manifest-then-tar order (the order the sample ranges index), read with tarfile."""
    keys = []
    for name in read_manifest(shard_dir).split(split).shards:
        with tarfile.open(shard_dir / name) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".jpg")]
    return keys


def test_split_pieces_cross_shard_boundaries():
    split = Split("train-unlabeled", ("a.tar", "b.tar", "c.tar"), (1000, 208, 50), 10)
    assert split.pieces(range(900, 1100)) == [(0, 900, 1000), (1, 0, 100)]
    assert split.pieces(range(1000, 1258)) == [(1, 0, 208), (2, 0, 50)]
    assert split.pieces(range(5, 5)) == []


def test_shuffle_buffer_yields_a_permutation():
    items = [(str(i), b"", i) for i in range(100)]
    out = list(shuffled(iter(items), 16, np.random.default_rng(0)))
    assert sorted(out) == sorted(items) and out != items
    assert out == list(shuffled(iter(items), 16, np.random.default_rng(0)))


def test_a_reader_has_every_index_before_its_first_sample(digits_shards: Path, monkeypatch):
    """Indexes are read up front, spans as the stream goes: a store that goes away mid-epoch then fails
    on a shard span, never on an index."""
    split = open_set(digits_shards)[1][TRAIN_UNLABELED]
    reads: list[tuple[str, int]] = []
    real_index, real_piece = reading.shard_index, reading.read_piece

    def shard_index(split, number):
        reads.append(("index", number))
        return real_index(split, number)

    def read_piece(split, number, first, stop, index):
        reads.append(("span", number))
        return real_piece(split, number, first, stop, index)

    monkeypatch.setattr(reading, "shard_index", shard_index)
    monkeypatch.setattr(reading, "read_piece", read_piece)
    samples = range(100, 900)  # shards 0 to 3 of 256 samples each
    stream = draws(split, samples, (0,), shuffle_buffer=64, cycle=False)
    assert reads == [("index", n) for n in range(4)]
    assert len(list(stream)) == 800
    assert sorted(reads[4:]) == [("span", n) for n in range(4)]  # then one span per shard, nothing else


# Batches per rank for the 558 unlabeled samples with U = 2, worked out by hand from the rule:
# rank r of W reads [r*558//W, (r+1)*558//W) (W=2: 279 each; W=3: 186 each), worker k of K the same
# split of its rank's range; a worker yields floor(n / 2) batches; every rank yields the minimum.
EXPECTED_BATCHES = {
    (1, 3): 93 + 93 + 93,  # 558 -> 186, 186, 186
    (2, 2): 69 + 70,  # 558 -> 279 -> 139, 140
    (3, 1): 93,  # 558 -> 186
    (3, 3): 31 + 31 + 31,  # 558 -> 186 -> 62, 62, 62
}


# each world size and each worker count, among them the ones whose workers get unequal shares (2, 2)
@pytest.mark.parametrize(("world_size", "workers"), [(1, 3), (2, 2), (3, 1), (3, 3)])
@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine
def test_ranks_and_workers_read_disjoint_ranges_covering_the_split(layout, world_size, workers):
    cfg = DataConfig(batch_size=3, labeled_per_batch=1, student_aug="none", teacher_aug="none",
                     eval_aug="digits-eval", workers=workers, shuffle_buffer=64, eval_batch_size=128)
    order = sample_order(layout, "train-unlabeled")
    total, expected = len(order), EXPECTED_BATCHES[(world_size, workers)]
    seen = []
    for rank in range(world_size):
        loaders = build_loaders(layout, cfg, rank=rank, world_size=world_size, with_keys=True)
        assert len(loaders.train) == expected
        keys = [key for batch in loaders.train for key in batch["key"][1:]]
        assert len(keys) == 2 * expected
        # a rank reads only its own range of the split, whatever the shard layout
        assert set(keys) <= set(order[rank * total // world_size:(rank + 1) * total // world_size])
        seen += keys
    assert len(seen) == len(set(seen)) == world_size * 2 * expected  # each sample at most once
    assert len(seen) >= 0.98 * total


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_scores_every_sample_once_across_ranks(layout, world_size):
    cfg = DataConfig(batch_size=8, labeled_per_batch=4, student_aug="none", teacher_aug="none",
                     eval_aug="digits-eval", workers=2, eval_batch_size=100)
    seen, lengths = [], set()
    for rank in range(world_size):
        val = build_loaders(layout, cfg, rank=rank, world_size=world_size, with_keys=True).val
        batches = list(val)
        lengths.add(len(batches))
        assert len(batches) == len(val)
        for batch in batches:
            assert len(batch["key"]) == int(batch["valid"].sum()) if "key" in batch else not batch["valid"].any()
            seen += batch.get("key", [])
    assert len(lengths) == 1  # every rank the same batch count
    assert sorted(seen) == sorted(sample_order(layout, "val"))


def _rewrite_members(shard: Path, change) -> None:
    """Rewrite a shard with `change(name, data) -> data` applied to each member, and its index."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            data = change(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    Path(index_name(str(shard))).write_text(build_index(shard))


@pytest.fixture
def digits_copy(digits_shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "digits"
    shutil.copytree(digits_shards, copy)
    return copy


def _shard(shard_dir: Path, split: str, number: int = 0) -> Path:
    return shard_dir / read_manifest(shard_dir).split(split).shards[number]


def _one_line_error(shards: Path, workers: int = 2) -> str:
    cfg = DataConfig(batch_size=64, labeled_per_batch=16, student_aug="digits-train", teacher_aug="digits-train",
                     eval_aug="digits-eval", workers=workers, shuffle_buffer=64, eval_batch_size=128)
    with pytest.raises(PipelineError) as error:
        loaders = build_loaders(shards, cfg)
        for _ in loaders.train:
            pass
        for _ in loaders.val:
            pass
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.timeout(60)
def test_a_set_where_no_labeled_image_decodes_stops_with_one_line(digits_copy):
    shard = _shard(digits_copy, "train-labeled")
    _rewrite_members(shard, lambda name, data: b"\0" * len(data) if name.endswith(".jpg") else data)
    message = _one_line_error(digits_copy)
    assert message.startswith(str(shard)) and "none of the" in message and "mt-shard verify --decode" in message


@pytest.mark.timeout(60)
def test_a_truncated_shard_is_refused_with_one_line(digits_copy):
    shard = _shard(digits_copy, "train-unlabeled", 1)
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    message = _one_line_error(digits_copy)
    assert message.startswith(str(shard)) and "truncated" in message and "mt-shard verify" in message


@pytest.mark.timeout(60)
def test_a_shard_truncated_after_the_loaders_were_built_fails_in_the_worker_with_one_line(digits_copy):
    cfg = DataConfig(batch_size=64, labeled_per_batch=16, student_aug="digits-train", teacher_aug="digits-train",
                     eval_aug="digits-eval", workers=2, shuffle_buffer=64, eval_batch_size=128)
    loaders = build_loaders(digits_copy, cfg)
    shard = _shard(digits_copy, "val")
    with open(shard, "r+b") as handle:
        handle.truncate(1024)
    with pytest.raises(PipelineError) as error:
        list(loaders.val)
    assert "\n" not in str(error.value) and str(error.value).startswith(str(shard)) and "truncated" in str(error.value)


@pytest.mark.timeout(60)
def test_a_malformed_label_member_is_one_line_naming_the_shard(digits_copy):
    shard = _shard(digits_copy, "train-labeled")
    _rewrite_members(shard, lambda name, data: data[:3] if name.endswith(".lbl") else data)
    message = _one_line_error(digits_copy)
    assert message.startswith(str(shard)) and "3-byte .lbl" in message


@pytest.mark.timeout(60)
def test_a_label_outside_the_classes_is_one_line_naming_the_shard(digits_copy):
    shard = _shard(digits_copy, "val")
    _rewrite_members(shard, lambda name, data: encode_label(10) if name.endswith(".lbl") else data)
    message = _one_line_error(digits_copy)
    assert message.startswith(str(shard)) and "label 10, outside 0..9" in message
