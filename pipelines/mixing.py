"""Labeled/unlabeled composition, shard assignment across ranks and workers, and epoch bookkeeping.

Rules (both backends):
- Shards are assigned once, not per epoch: rank r of W reads shards[r::W] of a split (manifest
  order; the packer shuffles globally, so each rank holds a random subset), and worker k of K on that
  rank reads its shards[k::K]. Epochs reshuffle the shard order and the sample buffer inside each worker.
- A training batch holds exactly L labeled rows then U unlabeled rows. The unlabeled stream defines
  the epoch: worker k yields floor(n_k / U) batches, n_k being its unlabeled sample count, so up to
  U - 1 samples per worker (its last partial batch) are not seen that epoch. The labeled stream cycles
  with a fresh shuffle per pass. With U = 0 the labeled stream defines the epoch the same way.
- Uneven shards: every rank yields the same number of batches, `min` over ranks of its own count, so
  collective ops never wait on a rank that ran out; a rank holding more samples leaves the surplus
  (different samples each epoch, since the order reshuffles) unseen. Shard counts divisible by
  world_size * workers and equal shard sizes keep the loss to the last partial batch per worker.
- The labeled split is small: when it has fewer shards than ranks (or a rank fewer than its
  workers), every rank (worker) reads all of them, each in its own shuffled order.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def seed_for(*parts: int | str) -> int:
    """A 31-bit seed from any mix of ints and strings (stable across processes, unlike hash())."""
    words = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) & 0xFFFFFFFF for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0] >> 1)


def split_indices(count: int, part: int, parts: int, *, share_if_short: bool) -> list[int]:
    """Indices of items `part` of `parts` reads: every parts-th one; all of them when there are
    fewer items than parts and `share_if_short` (used for the cycling labeled stream)."""
    if share_if_short and count < parts:
        return list(range(count))
    return list(range(part, count, parts))


@dataclass(frozen=True)
class StreamPlan:
    """The shards one worker of one rank reads for one split, with their sample total."""

    shards: tuple[str, ...]
    samples: int


def plan_stream(
    shards: Sequence[str], counts: Sequence[int], rank: int, world_size: int, worker: int, workers: int,
    *, share_if_short: bool,
) -> StreamPlan:
    by_rank = split_indices(len(shards), rank, world_size, share_if_short=share_if_short)
    mine = [by_rank[i] for i in split_indices(len(by_rank), worker, workers, share_if_short=share_if_short)]
    return StreamPlan(tuple(shards[i] for i in mine), int(sum(counts[i] for i in mine)))


def worker_quotas(
    counts: Sequence[int], rank: int, world_size: int, workers: int, per_batch: int
) -> list[int]:
    """Batches each worker of `rank` yields per epoch from the epoch-defining stream."""
    names = [str(i) for i in range(len(counts))]
    return [
        plan_stream(names, counts, rank, world_size, k, workers, share_if_short=False).samples // per_batch
        for k in range(workers)
    ]


def batches_per_epoch(counts: Sequence[int], world_size: int, workers: int, per_batch: int) -> int:
    """The batch count every rank yields: the minimum over ranks (see the module docstring)."""
    return min(sum(worker_quotas(counts, r, world_size, workers, per_batch)) for r in range(world_size))


def resume_skips(
    state: dict, quotas: Sequence[int], world_size: int, workers: int
) -> list[int]:
    """Batches each worker skips to resume at `state` (from TrainLoader.state_dict()).

    Exact when world size and worker count match the saved run (each worker replays its seeded
    stream and drops what it already yielded, so nothing repeats or is skipped). Otherwise each
    worker resumes at the saved fraction of the epoch, which can repeat or skip samples.
    """
    done = list(state.get("worker_batches", []))
    if state.get("world_size") == world_size and state.get("workers") == workers and len(done) == workers:
        return [min(d, q) for d, q in zip(done, quotas, strict=True)]
    total, saved_len = sum(done), max(int(state.get("batches_per_epoch", 0)), 1)
    fraction = min(total / saved_len, 1.0)
    return [int(fraction * q) for q in quotas]


def compose_batch(
    labeled: dict[str, torch.Tensor] | None, unlabeled: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Stack L labeled rows over U unlabeled rows; unlabeled labels become -1 whatever the shard said."""
    parts = [p for p in (labeled, unlabeled) if p is not None and len(p["label"])]
    if unlabeled is not None:
        unlabeled["label"] = torch.full_like(unlabeled["label"], -1)
    if len(parts) == 1:
        return dict(parts[0])
    batch = {k: torch.cat([p[k] for p in parts]) for k in ("student", "teacher", "label")}
    if all("key" in p for p in parts):
        batch["key"] = [key for p in parts for key in p["key"]]
    return batch
