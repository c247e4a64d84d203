"""Shard assignment, epoch length and resume arithmetic (pure functions, hand-derived expectations)."""

from __future__ import annotations

from pipelines.mixing import (
    batches_per_epoch,
    draw_rng,
    reader_range,
    reads_whole_split,
    resume_skips,
    sample_range,
    seed_for,
    worker_quotas,
)


def test_sample_range_is_floor_of_part_times_total_over_parts():
    assert [sample_range(10, p, 3) for p in range(3)] == [range(0, 3), range(3, 6), range(6, 10)]
    assert [len(sample_range(2, p, 3)) for p in range(3)] == [0, 1, 1]


def test_reader_ranges_split_each_rank_range_between_its_workers():
    # 1208 unlabeled digits, 2 ranks x 2 workers: ranks [0, 604) and [604, 1208), halved per worker
    ranges = [reader_range(1208, r, 2, k, 2) for r in range(2) for k in range(2)]
    assert ranges == [range(0, 302), range(302, 604), range(604, 906), range(906, 1208)]
    # 3 ranks x 3 workers of 100: ranks 33, 33, 34; rank 2 = [66, 100) -> 11, 11, 12
    assert [reader_range(100, 2, 3, k, 3) for k in range(3)] == [range(66, 77), range(77, 88), range(88, 100)]


def test_a_labeled_split_too_small_for_one_batch_per_reader_is_read_whole():
    assert reads_whole_split(50, readers=4, rows=16)  # 12 or 13 each would not fill 16 rows
    assert not reads_whole_split(50, readers=2, rows=16)


def test_epoch_length_is_the_minimum_over_ranks():
    # whatever the shard sizes (digits: 1000 + 208), 2 ranks hold 604 each; U = 24
    assert worker_quotas(1208, 0, 2, 1, 24) == worker_quotas(1208, 1, 2, 1, 24) == [25]
    assert batches_per_epoch(1208, 2, 1, 24) == 25
    # one rank, two workers of 604: 25 each
    assert batches_per_epoch(1208, 1, 2, 24) == 50
    # 10 samples, 3 ranks (3, 3, 4), U = 2: quotas 1, 1, 2; every rank yields the minimum, 1
    assert [worker_quotas(10, r, 3, 1, 2) for r in range(3)] == [[1], [1], [2]]
    assert batches_per_epoch(10, 3, 1, 2) == 1


def test_resume_skips_exact_with_same_topology_else_fractional():
    state = {"worker_batches": [3, 2], "world_size": 1, "workers": 2, "batches_per_epoch": 10}
    assert resume_skips(state, [5, 5], 1, 2) == [3, 2]
    assert resume_skips(state, [8, 8, 8, 8], 1, 4) == [4, 4, 4, 4]  # half the epoch done


def test_seed_for_is_stable_and_distinct():
    assert seed_for(0, 1, "key") == seed_for(0, 1, "key")
    assert len({seed_for(0, e, "key") for e in range(50)}) == 50
    assert 0 <= seed_for(2**40, -1, "x") < 2**31


def test_draw_rng_is_a_pure_function_of_stream_and_position():
    labeled, unlabeled = seed_for(0, 1, 0, 0, "labeled"), seed_for(0, 1, 0, 0, "unlabeled")
    assert draw_rng(labeled, 5).random() == draw_rng(labeled, 5).random()
    assert len({draw_rng(labeled, position).random() for position in range(100)}) == 100
    assert draw_rng(labeled, 5).random() != draw_rng(unlabeled, 5).random()
