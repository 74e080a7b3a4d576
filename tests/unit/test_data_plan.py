"""The epoch plan: exactly once, equal steps, token budget, per-epoch order, splitting for uneven counts, and each
rank batching only its own windows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scfm_data_service import DataError
from scfm_data_service.shuffle import (
    BLOCKS_PER_WINDOW,
    block_permutation,
    deal,
    is_val,
    make_plan,
    window_count,
    windows,
)


def _plan(n, world, epoch=0, seed=0, budget=1024, max_len=256, lengths=None, **kw):
    rng = np.random.default_rng(n)
    joinids = np.arange(n, dtype=np.int64) * 3 + 5  # not 0..n-1: the plan must not assume it
    if lengths is None:
        lengths = np.clip(rng.lognormal(4, 0.8, n).astype(np.int64), 1, max_len)
    plan = make_plan(
        joinids,
        lengths,
        max_len=max_len,
        tokens_per_batch=budget,
        max_cells=kw.pop("max_cells", 64),
        bucket_ratio=1.05,
        block=kw.pop("block", 100),
        seed=seed,
        epoch=epoch,
        world_size=world,
        **kw,
    )
    return joinids, dict(zip(joinids, lengths, strict=True)), plan


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), world=st.integers(1, 9), epoch=st.integers(0, 5))
def test_every_cell_exactly_once_equal_steps_within_budget(n, world, epoch):
    lengths = np.clip(np.random.default_rng(n).lognormal(4, 0.8, n).astype(np.int64), 1, 256)
    if n < 4 * world:  # a few cells per rank: windows of one or two cells cannot always be evened out
        try:
            _plan(n, world, epoch, lengths=lengths)
        except DataError as e:
            assert "world_size" in str(e)
        return
    joinids, length, plan = _plan(n, world, epoch, lengths=lengths)
    other = _plan(n, world, epoch + 1, lengths=lengths)[2]
    assert plan.steps == other.steps and plan.n_batches == plan.steps * world  # the same steps every epoch
    got = np.concatenate([plan.batch(r, s) for r in range(world) for s in range(plan.steps)])
    assert len(got) == n and np.array_equal(np.sort(got), joinids)
    for j in range(plan.n_batches):
        cells = plan.cells[plan.offsets[j] : plan.offsets[j + 1]]
        assert len(cells) >= 1
        assert len(cells) * max(length[c] for c in cells) <= 1024


def test_step_count_is_epoch_independent_and_order_differs():
    _, _, p0 = _plan(5000, 4, epoch=0)
    _, _, p1 = _plan(5000, 4, epoch=1)
    _, _, p0b = _plan(5000, 4, epoch=0)
    assert p0.steps == p1.steps
    assert np.array_equal(p0.cells, p0b.cells)  # deterministic: every rank computes the same plan
    assert not np.array_equal(p0.cells, p1.cells)
    assert not np.array_equal(p0.batch(0, 0), p1.batch(0, 0))
    # not a fixed per-rank slice: the cells a rank sees change between epochs
    r0 = {int(c) for s in range(p0.steps) for c in p0.batch(0, s)}
    r1 = {int(c) for s in range(p1.steps) for c in p1.batch(0, s)}
    assert len(r0 & r1) < 0.5 * len(r0)


def test_padding_is_small_with_buckets():
    # ~60 buckets of 64-cell batches: a window needs many cells per bucket for its leftover batches to be few
    _, length, plan = _plan(20_000, 1, budget=16384, max_len=2048, block=10_000)
    padded = real = 0
    for j in range(plan.n_batches):
        ls = [length[c] for c in plan.cells[plan.offsets[j] : plan.offsets[j + 1]]]
        padded += len(ls) * max(ls)
        real += sum(ls)
    assert 1 - real / padded < 0.05


def test_block_permutation_keeps_blocks_together():
    perm = block_permutation(1000, 100, seed=3, epoch=2)
    assert np.array_equal(np.sort(perm), np.arange(1000))
    blocks = perm // 100
    assert np.all(blocks.reshape(10, 100) == blocks.reshape(10, 100)[:, :1])  # each run of 100 = one block
    assert not np.array_equal(perm, block_permutation(1000, 100, seed=3, epoch=3))


def test_uneven_batch_counts_are_split_not_dropped():
    # 3 cells of one length and budget for 3 per batch: 1 batch; world 3 → split into 3 single-cell batches
    joinids, _, plan = _plan(3, 3, lengths=np.full(3, 10), budget=30, max_len=10)
    assert plan.steps == 1
    assert sorted(int(plan.batch(r, 0)[0]) for r in range(3)) == joinids.tolist()


def test_val_split_is_a_stable_hash_fraction():
    ids = np.arange(100_000)
    v = is_val(ids, 0.02)
    assert 0.015 < v.mean() < 0.025
    assert np.array_equal(v, is_val(ids, 0.02))
    assert not is_val(ids, 0.0).any()


def _window_of(joinids, block, world):
    return dict(zip(joinids, windows(len(joinids), window_count(len(joinids), block, world)), strict=True))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5000), block=st.integers(1, 700), epoch=st.integers(0, 3))
def test_batches_stay_inside_fixed_windows_and_count_is_epoch_independent(n, block, epoch):
    joinids, _, plan = _plan(n, 1, epoch, block=block)
    _, _, other = _plan(n, 1, epoch + 1, block=block)
    assert plan.n_batches == other.n_batches
    win_of = _window_of(joinids, block, 1)
    for j in range(plan.n_batches):
        cells = plan.cells[plan.offsets[j] : plan.offsets[j + 1]]
        assert {win_of[c] for c in cells} == {win_of[cells[0]]}  # one window per batch
    assert np.all(np.diff(plan.window) >= 0)  # the epoch walks the windows one by one


def test_a_window_is_a_few_contiguous_blocks():
    n_win = window_count(40_000, 4096, 4)
    assert n_win % 4 == 0
    win = windows(40_000, n_win)
    for w in range(n_win):
        idx = np.flatnonzero(win == w)
        assert np.count_nonzero(np.diff(idx) > 1) + 1 <= BLOCKS_PER_WINDOW
        assert 4096 // 2 < len(idx) <= 4096


@pytest.mark.parametrize("world", [2, 4, 7])
def test_each_rank_batches_whole_windows_of_its_own(world):
    """A rank reads only its windows: every window's cells go to one rank, so the cells a rank reads are ~1/world
    of the epoch, in BLOCKS_PER_WINDOW runs per window; steps grow by well under 1% over one rank's batch count."""
    n, block = 60_000, 1000
    joinids, _, plan = _plan(n, world, epoch=2, block=block, budget=4096, max_len=512)
    single = _plan(n, 1, epoch=2, block=block, budget=4096, max_len=512)[2]
    win_of = _window_of(joinids, block, world)
    owner = {}
    for r in range(world):
        mine = np.concatenate([plan.batch(r, s) for s in range(plan.steps)])
        wins = {win_of[c] for c in mine}
        assert not wins & set(owner), "a window is batched on two ranks"
        owner.update(dict.fromkeys(wins, r))
        assert abs(len(mine) - n / world) < 0.05 * n / world
        for w in wins:  # the rank's steps of one window are consecutive (one read unit)
            steps = [s for s in range(plan.steps) if win_of[plan.batch(r, s)[0]] == w]
            assert steps == list(range(steps[0], steps[0] + len(steps)))
    assert plan.steps * world <= 1.01 * single.n_batches
    # different cells per rank every epoch, as many steps
    _, _, nxt = _plan(n, world, epoch=3, block=block, budget=4096, max_len=512)
    assert nxt.steps == plan.steps
    a = {int(c) for s in range(plan.steps) for c in plan.batch(0, s)}
    b = {int(c) for s in range(nxt.steps) for c in nxt.batch(0, s)}
    assert len(a & b) < (1 / world + 0.25) * len(a)  # about what a random share of 1/world would keep


def test_deal_balances_batch_counts_and_depends_only_on_their_multiset():
    rng = np.random.default_rng(0)
    counts = rng.integers(20, 40, 64)
    groups = deal(counts, np.arange(64), 8)
    loads = np.bincount(groups, weights=counts, minlength=8)
    assert loads.max() - loads.min() <= counts.min()
    perm = rng.permutation(64)
    again = deal(counts[perm], rng.random(64), 8)
    assert sorted(np.bincount(again, weights=counts[perm], minlength=8)) == sorted(loads)
