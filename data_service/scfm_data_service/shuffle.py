"""The epoch plan: which cells go in which batch, on which rank, at which step.

Every rank computes the same plan independently from (cells, lengths, config, epoch, world_size):

1. Windows: with W ranks the cells (in soma_joinid order) go to n_windows windows, the fewest multiple of W that
   keeps a window at most `block` cells: they are cut into BLOCKS_PER_WINDOW × n_windows near-equal blocks and
   block k belongs to window k % n_windows, so a window is BLOCKS_PER_WINDOW runs of consecutive cells spread over
   the atlas and all windows hold the same number of cells (± BLOCKS_PER_WINDOW). Windows are the same sets every
   epoch; reading one is a few contiguous range reads.
2. Shuffle from (seed, epoch): the windows are permuted and the cells shuffled within each window.
3. Length bucketing inside a window: each bucket's cells are cut into full batches of the bucket's size; the
   leftovers of all buckets, longest bucket first, are packed greedily (a batch opened by a cell of bucket b takes
   up to size_b cells, all of bucket ≤ b, so the token budget holds). The batch count of a window depends only on
   how many cells of each bucket it holds, so it is the same every epoch. Batches are shuffled within their
   window; no batch spans two windows.
4. Dealing windows to ranks: each window goes whole to one of W groups, longest-processing-time first (windows by
   batch count, descending, each to the group with the fewest batches so far; equal counts in this epoch's window
   order). The sorted counts are the same every epoch, so the group sizes are too, while windows of equal count
   trade groups between epochs. Group g runs on rank (g + epoch) % W. A rank reads only its own windows: 1/W of
   the cells, in the same few range reads per window (no read amplification with W).
5. Equal steps: every group is brought to the largest group's batch count by splitting its batches with most
   cells in two (adjacent halves). Nothing is dropped or repeated; steps per epoch do not depend on the epoch.
6. A group's k-th batch is batch j = k·W + rank of the plan: batch j runs on rank j % W as its step j // W.

The val and all splits use the identity order (no shuffle): consecutive windows of consecutive cells, dealt the
same way (no rotation).
"""

from __future__ import annotations

import heapq
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


@dataclass(frozen=True)
class EpochPlan:
    """Batches of one epoch: batch j holds cells[offsets[j]:offsets[j+1]] and runs on rank j % world_size."""

    cells: np.ndarray  # int64 [N] soma_joinids, in batch order
    lengths: np.ndarray  # int64 [N] token lengths of `cells`
    offsets: np.ndarray  # int64 [n_batches + 1]
    world_size: int
    window: np.ndarray | None = None  # int64 [n_batches] read window of each batch (non-decreasing along a rank)

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


BLOCKS_PER_WINDOW = 4  # places in the atlas a shuffled window draws from (one range read each)


def window_count(n: int, block: int, world_size: int = 1) -> int:
    """Windows of an epoch of n cells: a multiple of world_size, each window at most `block` cells (the fewest such)."""
    return world_size * max(1, -(-n // (world_size * max(1, block))))


def windows(n: int, n_windows: int, spread: int = BLOCKS_PER_WINDOW) -> np.ndarray:
    """int64 [n]: window of each of n cells (joinid order): spread × n_windows near-equal blocks of consecutive
    cells, block k → window k % n_windows (so windows differ in size by at most `spread` cells)."""
    n_blocks = max(1, n_windows * spread)
    return (np.arange(n, dtype=np.int64) * n_blocks // max(1, n)) % max(1, n_windows)


def _pack_leftovers(bucket: np.ndarray, win: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Batch starts (indices) over leftover cells grouped by window, bucket descending: a batch opened by a cell of
    bucket b takes up to size[b] cells of its window."""
    starts, i, n = [], 0, len(bucket)
    ends = np.append(np.flatnonzero(np.diff(win)) + 1, n)
    for end in ends.tolist():
        while i < end:
            starts.append(i)
            i = min(end, i + int(size[bucket[i]]))
    return np.asarray(starts, dtype=np.int64)


def _windowed_batches(
    bucket: np.ndarray, lengths: np.ndarray, win_rank: np.ndarray, keys: np.ndarray, size: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(cell pool, batch starts into it, batch sizes, batch window) with every batch inside one window: full
    batches per (window, bucket), then each window's leftovers packed longest first (the count depends only on
    the buckets, the exact-length order keeps the padding small)."""
    n = len(bucket)
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z
    order = np.lexsort((keys, -bucket, win_rank))  # window, bucket (longest first), shuffled
    b, w = bucket[order], win_rank[order]
    g_start = np.flatnonzero(np.r_[True, (np.diff(b) != 0) | (np.diff(w) != 0)])
    g_len = np.diff(np.append(g_start, n))
    g_size = size[b[g_start]]
    n_full = g_len // g_size
    # a group's first n_full × size cells form its full batches; the rest are leftovers
    pos = np.arange(n) - np.repeat(g_start, g_len)
    in_full = pos < np.repeat(n_full * g_size, g_len)
    full_sizes = np.repeat(g_size, n_full)
    full_win = np.repeat(w[g_start], n_full)
    left = np.flatnonzero(~in_full)
    left = left[np.lexsort((keys[order[left]], -lengths[order[left]], w[left]))]  # window, longest first
    l_starts = _pack_leftovers(b[left], w[left], size)
    l_sizes = np.diff(np.append(l_starts, len(left)))
    n_in_full = int(in_full.sum())
    pool = np.concatenate([order[in_full], order[left]])
    starts = np.concatenate([np.cumsum(full_sizes) - full_sizes, l_starts + n_in_full])
    sizes = np.concatenate([full_sizes, l_sizes])
    win = np.concatenate([full_win, w[left[l_starts]]])
    return pool, starts, sizes, win


def _split(sizes: np.ndarray, src: np.ndarray, which: np.ndarray, *carried: np.ndarray):
    """Split batches `which` into two adjacent halves: (sizes, source offsets, *carried) with the halves in place."""
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
    return (sizes, src, *(np.repeat(c, reps) for c in carried))


def deal(counts: np.ndarray, order_key: np.ndarray, world_size: int) -> np.ndarray:
    """int64 [n_windows]: group of each window, longest processing time first: windows by batch count (descending,
    ties by order_key) each go to the group with the fewest batches so far (ties: lowest group). The group sizes
    depend only on the multiset of counts."""
    group = np.zeros(len(counts), dtype=np.int64)
    if world_size == 1:
        return group
    order = np.lexsort((order_key, -counts))
    heap = [(0, g) for g in range(world_size)]
    for w, c in zip(order.tolist(), counts[order].tolist(), strict=True):
        load, g = heapq.heappop(heap)
        group[w] = g
        heapq.heappush(heap, (load + c, g))
    return group


def _equalize(sizes, src, grp, bwin, world_size: int, n: int):
    """Split each group's batches with most cells until every group has the largest group's batch count; arrays
    stay grouped (a split batch's halves are adjacent)."""
    target = int(np.bincount(grp, minlength=world_size).max()) if len(grp) else 0
    while True:
        need = target - np.bincount(grp, minlength=world_size)
        if not need.any():
            return sizes, src, grp, bwin
        o = np.lexsort((-sizes, grp))  # by group, most cells first (stable)
        first = np.searchsorted(grp[o], np.arange(world_size))
        nth = np.arange(len(o)) - first[grp[o]]
        pick = o[(nth < need[grp[o]]) & (sizes[o] >= 2)]
        short = np.bincount(grp[pick], minlength=world_size) < np.minimum(need, 1)
        if short.any():  # a group that needs batches has no batch of ≥ 2 cells left
            raise DataError(
                f"{n} cells cannot be spread over world_size={world_size} ranks with equal steps; "
                "use fewer ranks or more cells"
            )
        sizes, src, grp, bwin = _split(sizes, src, pick, grp, bwin)


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
    """Plan one epoch over cells `joinids` (int64 [N], sorted) with token lengths `lengths` (int64 [N]);
    `block` is the most cells of a window (one rank batches a window's cells together)."""
    if world_size < 1:
        raise DataError(f"world_size={world_size} must be ≥ 1")
    n = len(joinids)
    edges = bucket_edges(max_len, bucket_ratio)
    size = bucket_batch_cells(edges, tokens_per_batch, max_cells)
    bucket = assign_buckets(lengths, edges)
    n_win = window_count(n, block, world_size)
    if shuffle:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x5CF])
        rank_of = np.empty(n_win, dtype=np.int64)
        rank_of[rng.permutation(n_win)] = np.arange(n_win)
        win_rank, keys = rank_of[windows(n, n_win)], rng.random(n)
    else:  # consecutive windows of consecutive cells
        win_rank, keys = np.arange(n, dtype=np.int64) * n_win // max(1, n), np.arange(n, dtype=np.float64)
    pool, src, sizes, bwin = _windowed_batches(bucket, lengths, win_rank, keys, size)
    # windows (by their place in this epoch's order) dealt to groups; a group's batches in window order, shuffled
    # within their window
    n_pos = int(bwin.max()) + 1 if len(bwin) else 0
    group_of = deal(np.bincount(bwin, minlength=n_pos), np.arange(n_pos), world_size)
    b_keys = rng.random(len(sizes)) if shuffle else np.arange(len(sizes), dtype=np.float64)
    grp = group_of[bwin]
    bo = np.lexsort((b_keys, bwin, grp))
    sizes, src, bwin, grp = sizes[bo], src[bo], bwin[bo], grp[bo]
    sizes, src, grp, bwin = _equalize(sizes, src, grp, bwin, world_size, n)
    # group g's k-th batch is batch k × world_size + its rank, (g + epoch) % world_size
    steps = len(sizes) // world_size
    rank = (grp + (epoch if shuffle else 0)) % world_size
    j = np.argsort((np.arange(len(sizes)) - grp * steps) * world_size + rank)
    sizes, src, bwin = sizes[j], src[j], bwin[j]
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    idx = pool[np.repeat(src - offsets[:-1], sizes) + np.arange(offsets[-1])]
    return EpochPlan(joinids[idx], lengths[idx], offsets, world_size, bwin)
