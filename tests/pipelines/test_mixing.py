"""Shard assignment, epoch length and resume arithmetic (pure functions, hand-derived expectations)."""

from __future__ import annotations

import torch

from pipelines.mixing import (
    batches_per_epoch,
    compose_batch,
    plan_stream,
    resume_skips,
    seed_for,
    split_indices,
    worker_quotas,
)


def test_split_indices_are_disjoint_and_share_only_when_asked():
    parts = [split_indices(10, p, 3, share_if_short=False) for p in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert split_indices(2, 2, 3, share_if_short=False) == []  # more readers than shards: idle
    assert split_indices(2, 2, 3, share_if_short=True) == [0, 1]  # the cycling labeled stream: all


def test_plan_stream_splits_by_rank_then_worker():
    shards, counts = [f"s{i}" for i in range(8)], [10] * 7 + [4]
    plans = {(r, k): plan_stream(shards, counts, r, 2, k, 2, share_if_short=False) for r in range(2) for k in range(2)}
    assert plans[(0, 0)].shards == ("s0", "s4") and plans[(0, 1)].shards == ("s2", "s6")
    assert plans[(1, 1)].shards == ("s3", "s7") and plans[(1, 1)].samples == 14
    every = [s for p in plans.values() for s in p.shards]
    assert sorted(every) == shards  # disjoint and complete


def test_epoch_length_is_the_minimum_over_ranks():
    counts = [256, 256, 256, 256, 184]  # digits' unlabeled shards
    # rank 0 reads shards 0,2,4 (696), rank 1 shards 1,3 (512); one worker each, U = 24
    assert worker_quotas(counts, 0, 2, 1, 24) == [29]
    assert worker_quotas(counts, 1, 2, 1, 24) == [21]
    assert batches_per_epoch(counts, 2, 1, 24) == 21
    # one rank, two workers: 696 // 24 + 512 // 24
    assert batches_per_epoch(counts, 1, 2, 24) == 29 + 21


def test_resume_skips_exact_with_same_topology_else_fractional():
    state = {"worker_batches": [3, 2], "world_size": 1, "workers": 2, "batches_per_epoch": 10}
    assert resume_skips(state, [5, 5], 1, 2) == [3, 2]
    assert resume_skips(state, [8, 8, 8, 8], 1, 4) == [4, 4, 4, 4]  # half the epoch done


def test_compose_batch_puts_labeled_first_and_masks_unlabeled_labels():
    labeled = {"student": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "teacher": torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
               "label": torch.tensor([3, 7])}
    unlabeled = {"student": torch.ones(3, 3, 4, 4, dtype=torch.uint8), "teacher": torch.ones(3, 3, 4, 4, dtype=torch.uint8),
                 "label": torch.tensor([5, 5, 5])}
    batch = compose_batch(labeled, unlabeled)
    assert batch["label"].tolist() == [3, 7, -1, -1, -1]
    assert batch["student"][:2].sum() == 0 and bool((batch["student"][2:] == 1).all())
    assert compose_batch(labeled, None)["label"].tolist() == [3, 7]


def test_seed_for_is_stable_and_distinct():
    assert seed_for(0, 1, "key") == seed_for(0, 1, "key")
    assert len({seed_for(0, e, "key") for e in range(50)}) == 50
    assert 0 <= seed_for(2**40, -1, "x") < 2**31
