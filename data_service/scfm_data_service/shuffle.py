"""The epoch plan: which cells go in which batch, on which rank, at which step.

Every rank computes the same plan independently from (cells, lengths, config, epoch, world_size):

1. Global permutation from (seed, epoch): blocks of `shuffle_block_cells` consecutive soma_joinids are permuted,
   and cells are shuffled within each block (block reads stay local; the order differs every epoch).
2. Length bucketing: each bucket's cells, in permutation order, are cut into batches of the bucket's size. The
   batch count per bucket is ceil(n_b / size_b), so the total does not depend on the epoch.
3. Batches are ordered by the permutation position of their last cell (the stream walks the atlas block by block).
4. Rebalancing: if the batch count is not a multiple of world_size, the batches with most cells are split in
   two (adjacent halves) until it is. Nothing is dropped or repeated.
5. Batch j goes to rank j % world_size as its step j // world_size: all ranks run the same number of steps.

The val and all splits use the identity order (no shuffle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scfm_data_service.bucketing import assign_buckets, bucket_batch_cells, bucket_edges
from scfm_data_service.errors import DataError

_VAL_SALT = 0x9E3779B97F4A7C15


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorized splitmix64 finalizer on uint64 (a fast, well-mixed hash)."""
    z = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def is_val(joinids: np.ndarray, val_fraction: float) -> np.ndarray:
    """bool [N]: the held-out cells, chosen by a hash of soma_joinid (stable across seeds, epochs, appends)."""
    u = splitmix64(np.asarray(joinids, dtype=np.int64).view(np.uint64) ^ np.uint64(_VAL_SALT))
    return (u >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_fraction


def block_permutation(n: int, block: int, seed: int, epoch: int) -> np.ndarray:
    """int64 [n]: permutation of range(n) that permutes blocks of `block` indices and shuffles within blocks."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x5CF])
    n_blocks = -(-n // block)
    block_rank = np.empty(n_blocks, dtype=np.int64)
    block_rank[rng.permutation(n_blocks)] = np.arange(n_blocks)
    keys = rng.random(n)
    return np.lexsort((keys, block_rank[np.arange(n) // block]))


def _split(sizes: np.ndarray, src: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split batches `which` into two adjacent halves (sizes and source offsets updated)."""
    split = np.zeros(len(sizes), dtype=bool)
    split[which] = True
    reps = np.where(split, 2, 1)
    half = sizes // 2
    first = np.cumsum(reps) - reps
    second = first[split] + 1
    sizes, src = np.repeat(sizes, reps), np.repeat(src, reps)
    sizes[first[split]] = half[split]
    sizes[second] -= half[split]
    src[second] += half[split]
    return sizes, src


@dataclass(frozen=True)
class EpochPlan:
    """Batches of one epoch: batch j holds cells[offsets[j]:offsets[j+1]] and runs on rank j % world_size."""

    cells: np.ndarray  # int64 [N] soma_joinids, in batch order
    lengths: np.ndarray  # int64 [N] token lengths of `cells`
    offsets: np.ndarray  # int64 [n_batches + 1]
    world_size: int

    @property
    def n_batches(self) -> int:
        return len(self.offsets) - 1

    @property
    def steps(self) -> int:
        return self.n_batches // self.world_size

    def batch_index(self, rank: int, step: int) -> int:
        return step * self.world_size + rank

    def batch(self, rank: int, step: int) -> np.ndarray:
        j = self.batch_index(rank, step)
        return self.cells[self.offsets[j] : self.offsets[j + 1]]


def make_plan(
    joinids: np.ndarray,
    lengths: np.ndarray,
    *,
    max_len: int,
    tokens_per_batch: int,
    max_cells: int,
    bucket_ratio: float,
    block: int,
    seed: int,
    epoch: int,
    world_size: int,
    shuffle: bool = True,
) -> EpochPlan:
    """Plan one epoch over cells `joinids` (int64 [N]) with token lengths `lengths` (int64 [N])."""
    if world_size < 1:
        raise DataError(f"world_size={world_size} must be ≥ 1")
    n = len(joinids)
    edges = bucket_edges(max_len, bucket_ratio)
    size = bucket_batch_cells(edges, tokens_per_batch, max_cells)
    order = block_permutation(n, max(1, block), seed, epoch) if shuffle else np.arange(n, dtype=np.int64)
    bucket = assign_buckets(lengths, edges)
    by_bucket = order[np.argsort(bucket[order], kind="stable")]  # grouped by bucket, permutation order within
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    # cut every bucket's run into batches of that bucket's size
    counts = np.bincount(bucket, minlength=len(edges))
    starts = []
    run_start = 0
    for b in np.flatnonzero(counts):
        starts.append(np.arange(run_start, run_start + counts[b], size[b]))
        run_start += counts[b]
    starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
    bounds = np.append(starts, n)
    last = pos[by_bucket[bounds[1:] - 1]] if n else np.zeros(0, dtype=np.int64)
    batch_order = np.argsort(last, kind="stable")
    sizes = (bounds[1:] - bounds[:-1])[batch_order]
    src = starts[batch_order]
    # rebalance to a multiple of world_size by splitting the largest batches (rounds, for tiny epochs)
    need = (-len(sizes)) % world_size
    while need:
        cand = np.argsort(-sizes, kind="stable")[:need]
        cand = cand[sizes[cand] >= 2]
        if len(cand) == 0:
            raise DataError(
                f"{n} cells cannot be spread over world_size={world_size} ranks with equal steps; "
                "use fewer ranks or more cells"
            )
        sizes, src = _split(sizes, src, cand)
        need -= len(cand)
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    idx = np.repeat(src - offsets[:-1], sizes) + np.arange(offsets[-1])
    cells_idx = by_bucket[idx] if n else by_bucket
    return EpochPlan(joinids[cells_idx], lengths[cells_idx], offsets, world_size)
