"""Who reads which samples, how long an epoch is, and what a batch holds: the rules of both backends.

- Reading is by sample. A split's samples are its shards' samples concatenated in manifest order.
  Part p of P parts of N samples is [p*N//P, (p+1)*N//P) (`sample_range`, DALI's own sharding rule):
  rank r of W gets that range of the split, and loader worker k of K that range of its rank's range.
  Both backends run K = max(data.workers, 1) readers per rank. Shares are the same every epoch; the
  order within a reader is reshuffled every epoch (seeded), so the samples left out with a last
  partial batch change.
- A training batch holds exactly L labeled rows then U unlabeled rows. The unlabeled stream defines the
  epoch: a reader yields floor(n / U) batches from its n samples, so only its last partial batch is
  not seen that epoch. Every rank yields the same count, the minimum over ranks (`batches_per_epoch`),
  so collectives never wait on a rank that ran out; shares differ by at most one sample, so the
  minimum loses at most a batch per rank. With U = 0 the labeled stream defines the epoch the same way.
- The labeled stream cycles, each pass in a fresh seeded order. When the labeled split holds fewer
  than readers * L samples (a reader's share would not fill one batch), every reader reads all of it,
  in its own order (`reads_whole_split`).
- Augmentation randomness is fresh on every draw and a pure function of (seed, epoch, rank, worker,
  stream, position in the worker's stream) (`draw_rng`), so resuming replays exactly; the sample
  order of each pass is seeded the same way.
- Val: the same ranges, in order, no shuffle; every sample is scored once across ranks.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np


def _words(parts: Sequence[int | str]) -> list[int]:
    return [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) & 0xFFFFFFFF for p in parts]


def seed_for(*parts: int | str) -> int:
    """A 31-bit seed from any mix of ints and strings (stable across processes, unlike hash())."""
    return int(np.random.SeedSequence(_words(parts)).generate_state(1)[0] >> 1)


def draw_rng(stream: int, position: int) -> np.random.Generator:
    """The generator of draw `position` of a stream seeded `stream` = seed_for(seed, epoch, rank, worker, tag)."""
    return np.random.default_rng((stream << 40) | position)


def sample_range(total: int, part: int, parts: int) -> range:
    """Part `part` of `parts` of `total` samples: [part*total//parts, (part+1)*total//parts)."""
    return range(part * total // parts, (part + 1) * total // parts)


def reader_range(total: int, rank: int, world_size: int, worker: int = 0, workers: int = 1) -> range:
    """The samples worker `worker` of `workers` on `rank` of `world_size` reads: a range of its rank's."""
    by_rank = sample_range(total, rank, world_size)
    own = sample_range(len(by_rank), worker, workers)
    return range(by_rank.start + own.start, by_rank.start + own.stop)


def reads_whole_split(total: int, readers: int, rows: int) -> bool:
    """Whether every reader reads all of a cycling split: its share would not fill `rows` rows."""
    return total < readers * rows


def worker_quotas(total: int, rank: int, world_size: int, workers: int, per_batch: int) -> list[int]:
    """Batches each worker of `rank` yields per epoch from the epoch-defining stream of `total` samples."""
    return [len(reader_range(total, rank, world_size, k, workers)) // per_batch for k in range(workers)]


def batches_per_epoch(total: int, world_size: int, workers: int, per_batch: int) -> int:
    """The batch count every rank yields: the minimum over ranks of its workers' quotas."""
    return min(sum(worker_quotas(total, r, world_size, workers, per_batch)) for r in range(world_size))


def resume_skips(state: dict, quotas: Sequence[int], world_size: int, workers: int) -> list[int]:
    """Batches each worker skips to resume at `state` (from TrainLoader.state_dict()).

    Exact when world size and worker count match the saved run (each worker replays its seeded
    stream and drops what it already yielded). Otherwise each worker resumes at the saved fraction
    of the epoch, which can repeat or skip samples.
    """
    done = list(state.get("worker_batches", []))
    if same_topology(state, world_size, workers):
        return [min(d, q) for d, q in zip(done, quotas, strict=True)]
    total, saved_len = sum(done), max(int(state.get("batches_per_epoch", 0)), 1)
    fraction = min(total / saved_len, 1.0)
    return [int(fraction * q) for q in quotas]


def same_topology(state: dict, world_size: int, workers: int) -> bool:
    return (state.get("world_size") == world_size and state.get("workers") == workers
            and len(state.get("worker_batches", [])) == workers)
