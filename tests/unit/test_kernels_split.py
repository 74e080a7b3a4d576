"""The planned launch of the warp-specialized forward (`scfm_kernels._split`) under the interpreter: the work table
(which program runs which part of which tile, in which order) and the kernel that adds the parts. The forward
itself runs on the GPU only (Gluon): tests/gpu/test_kernels_gpu.py checks it against float64 with small
multiprocessor counts that force splits."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import triton

from scfm_kernels import _split

S_MAX, C_FIX = int(_split.S_MAX), float(_split.C_FIX.value)


def _part_blocks(n: int, part: int, s: int, block_n: int) -> tuple[int, int]:
    """`_split.part_blocks` in Python."""
    unit = int(_split.KEY_UNIT)
    units, per = -(-n // unit), unit // block_n
    lo = (part * units // s) * per
    hi = min(((part + 1) * units // s) * per, -(-n // block_n))
    return lo, max(hi, lo)


def _expected_s(r: int, nsm: int, keys: int) -> int:
    """The fewest pieces that minimise the modelled time of the last r tiles, the longest of which has `keys`."""
    if r == 0:
        return 1
    units = -(-keys // int(_split.KEY_UNIT))
    best_s, best = 1, 2 * units + C_FIX
    for s in range(2, S_MAX + 1):
        cost = -(-r * s // nsm) * (2 * -(-units // s) + C_FIX)
        if cost < best - 1e-3:
            best_s, best = s, cost
    return best_s


def _table(
    lens: list[int], H: int, rows: int, nsm: int, varlen: bool, t_max: int | None = None, zero_all_heads: bool = False
):
    T = t_max if t_max is not None else max(max(lens), 1)
    n_m = triton.cdiv(T, rows)
    if varlen:
        seq = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    else:
        seq = torch.tensor(lens, dtype=torch.int32)
    work = _split.plan(seq, varlen, T, (len(lens), H, n_m, nsm), rows, zero_all_heads)
    total = _split.grid_size(n_m, len(lens), H, nsm)
    row = int(_split.ROW)
    return work[: total * row].view(total, row).tolist(), work[total * row :][:3].tolist(), n_m


@pytest.mark.parametrize("seed", range(12))
def test_the_work_table_runs_every_tile_once_longest_first_and_splits_the_tail(seed):
    """Random lengths (empty sequences included), heads, tile heights and multiprocessor counts (chosen so that
    most seeds split), padded or packed: every valid tile runs whole once or as its s parts once each (their key
    blocks cover the sequence exactly, at both key-block widths), every tile past a padded sequence's end is written
    once (per head, or with zero_all_heads once for every head) and packed ones get none, sequences run longest
    first, s follows the cost rule, and the table's tail names the split tiles for the finishing kernel."""
    rng = random.Random(seed)
    zero_all = seed % 2 == 1
    H, rows, varlen = rng.choice([1, 2, 3]), rng.choice([64, 192]), seed % 3 == 2
    lens = [rng.choice([0, 1, 63, 64, 200, 383, 700, 1001, 1500]) for _ in range(rng.randint(1, 5))]
    lens[0] = max(lens[0], 1)
    T = max(lens)
    n_m = triton.cdiv(T, rows)
    order = sorted(range(len(lens)), key=lambda b: (-lens[b], b))
    ranked = [(b, h, m) for b in order for h in range(H) for m in range(triton.cdiv(lens[b], rows))]
    N = len(ranked)
    nsm = rng.choice([k for k in range(3, N + 3)] or [5]) if seed % 4 else rng.choice([5, 7, 13, 40])
    table, (first, n_split, s_tail), n_m = _table(lens, H, rows, nsm, varlen, zero_all_heads=zero_all)
    r = N % nsm
    s = _expected_s(r, nsm, lens[ranked[N - r][0]] if r else 0)  # the last round's longest tile
    split = set(ranked[N - r :]) if s > 1 else set()
    assert (first, n_split, s_tail) == ((N - r, r, s) if s > 1 else (N, 0, 1)), (N, r, nsm, s)

    whole_order, parts, empties = [], {}, []
    for pid, (b, h, m, part, n_parts, piece, n, start) in enumerate(table):
        if piece == -2:
            continue
        assert n == lens[b] and start == (sum(lens[:b]) if varlen else 0), f"program {pid}: n={n} start={start}"
        if m >= triton.cdiv(lens[b], rows):
            want_piece = -3 if zero_all else -1
            assert piece == want_piece and not varlen, f"program {pid}: tile {(b, h, m)} past the end, piece {piece}"
            empties.append((b, h, m))
            continue
        if piece == -1:
            assert (b, h, m) not in split and (part, n_parts) == (0, 1), f"program {pid}: {(b, h, m)} ran whole"
            whole_order.append((b, h, m))
            continue
        assert (b, h, m) in split and n_parts == s, f"program {pid}: tile {(b, h, m)} in {n_parts} parts, want {s}"
        assert (b, h, m, part) not in parts, f"part {(b, h, m, part)} ran twice"
        parts[(b, h, m, part)] = piece
    assert whole_order == [t for t in ranked if t not in split], "whole tiles not once each, longest first"
    assert set(parts) == {(*t, k) for t in split for k in range(s)}, "a part of a split tile never ran"
    assert sorted(parts.values()) == list(range(len(split) * s)), "partial slots are not 0 … r·s − 1"
    for i, t in enumerate(ranked[N - r :] if s > 1 else []):
        assert [parts[(*t, k)] for k in range(s)] == list(range(i * s, i * s + s)), f"tile {t}'s slots"
        for block_n in (64, 128):
            blocks = [_part_blocks(lens[t[0]], k, s, block_n) for k in range(s)]
            assert blocks[0][0] == 0 and blocks[-1][1] == triton.cdiv(lens[t[0]], block_n), f"{t}: {blocks}"
            assert all(a[1] == c[0] for a, c in itertools.pairwise(blocks)), f"tile {t}: parts {blocks} overlap"
    heads = [0] if zero_all else range(H)
    want_empty = [(b, h, m) for b in order for h in heads for m in range(n_m) if m * rows >= lens[b]]
    want_empty = [] if varlen else want_empty
    assert sorted(empties) == sorted(want_empty), "tiles past the end not written exactly once"
    busy = [row for row in table if row[5] != -2]
    assert len(busy) == N + len(split) * (s - 1) + len(want_empty), "programs with work are not packed first"
    assert all(row[5] != -2 for row in table[: len(busy)]), "a program with nothing to do sits among the work"


@pytest.mark.parametrize(
    ("lens", "t_max", "varlen"),
    [
        ([900], 64, True),  # packed, max_seqlen below the length: only the first tiles, as the 2-D grid
        ([900, 10], 100, False),  # padded, a length past T: clamped to T
        ([50, 20], 400, False),  # padded, T past every length: more tiles past the ends
        ([0, 0, 0], 64, False),  # nothing to do but zeros
        ([0, 0], 64, True),
    ],
)
@pytest.mark.parametrize("zero_all", [False, True])
def test_the_work_table_stays_inside_its_grid_at_the_edges(lens, t_max, varlen, zero_all):
    """Lengths and T that disagree: every row the table names lies inside the grid, each tile of the first
    ⌈T/rows⌉ runs once (whole or in parts), padded tiles past the clamped ends are written once (per head, or once
    for every head), and the tail's split tiles are rows of the table."""
    H, rows, nsm = 2, 64, 3
    table, (first, n_split, s), n_m = _table(lens, H, rows, nsm, varlen, t_max, zero_all)
    n = [min(x, t_max) for x in lens] if not varlen else lens
    tiles = [min(triton.cdiv(x, rows), n_m) for x in n]
    N = H * sum(tiles)
    assert first + n_split * s <= len(table) and first <= N, (first, n_split, s, len(table))
    seen: dict[tuple[int, int, int], list[int]] = {}
    for b, h, m, part, _, piece, got_n, _ in table:
        if piece != -2:
            assert got_n == n[b], f"sequence {b}: n={got_n}, want {n[b]}"
            seen.setdefault((b, h, m), []).append(part)
    want = {(b, h, m): list(range(s)) if s > 1 and i >= first else [0]
            for i, (b, h, m) in enumerate((b, h, m) for b in sorted(range(len(lens)), key=lambda b: (-n[b], b))
                                          for h in range(H) for m in range(tiles[b]))}  # fmt: skip
    if not varlen:
        heads = [0] if zero_all else range(H)
        want |= {(b, h, m): [0] for b in range(len(lens)) for h in heads for m in range(tiles[b], n_m)}
    assert {k: sorted(v) for k, v in seen.items()} == want


def test_the_cost_rule_splits_a_short_last_round_and_leaves_a_full_one():
    """At the H200's 132 multiprocessors: 832 tiles of 9,896 keys (r = 40) run in thirds; 1,408 tiles of 4,096
    keys (r = 88) in thirds over two rounds; 1,320 (r = 0) and 1,040 tiles (r = 116, no gain) whole."""
    assert [_expected_s(r, 132, k) for r, k in ((40, 9896), (88, 4096), (0, 4096), (116, 2185))] == [3, 3, 1, 1]
    _, tail, _ = _table([9896], 16, 192, 132, False)
    assert tail == [792, 40, 3]
    _, tail, _ = _table([4096] * 4, 16, 192, 132, False)
    assert tail == [1408 - 88, 88, 3]


def test_the_cost_rule_reads_the_last_rounds_longest_tile():
    """A last round that mixes lengths lasts as long as its longest tile: at 7 multiprocessors, 38 tiles of a
    1,500-, a 700- and a 1-token sequence (2 heads, 128 rows) leave r = 3, one of 700 keys and two of 1 key, and
    halves of them fit one round (6 + 6 against 2·6 + 6 key-block times), though the 1-key tiles alone gain
    nothing."""
    assert _expected_s(3, 7, 700) == 2 and _expected_s(3, 7, 1) == 1
    _, tail, _ = _table([1500, 1, 700], 2, 128, 7, False)
    assert tail == [35, 3, 2]


@pytest.mark.parametrize(("varlen", "D", "paired"), [(False, 16, False), (True, 16, False), (False, 48, True)])
def test_finish_adds_the_parts_in_order_and_zeroes_padding(varlen, D, paired):
    """Partials of the split tiles added into the output in part order; padding rows of a padded batch become 0,
    the rows of tiles that ran whole are untouched. paired: the backward's layout, each piece's dK partial then
    its dV partial (the second half finished here, piece stride 2·rows·D), at a head dim that is no power of 2."""
    rows, H, nsm = 128, 2, 7
    lens = [130, 300]  # 2 + 3 tiles per head, longest first: 10 tiles, r = 3 → s = 2 (one round of halves)
    B, T = len(lens), max(lens)
    if varlen:
        seq = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
        o = torch.full((1, sum(lens), H, D), float("nan"))
        strides = (0, o.stride(1), o.stride(2))
    else:
        seq = torch.tensor(lens, dtype=torch.int32)
        o = torch.full((B, T, H, D), float("nan"))
        strides = (o.stride(0), o.stride(1), o.stride(2))
    n_m = triton.cdiv(T, rows)
    total = _split.grid_size(n_m, B, H, nsm)
    work = _split.plan(seq, varlen, T, (B, H, n_m, nsm), rows)
    ranked = [(b, h, m) for b in (1, 0) for h in range(H) for m in range(triton.cdiv(lens[b], rows))]
    r, s = len(ranked) % nsm, 2
    assert r == 3 and _expected_s(r, nsm, lens[0]) == s
    halves = 2 if paired else 1
    part = torch.randn(S_MAX * nsm * halves * rows * D)
    meta = dict(TILE_ROWS=rows, HEAD_DIM=D, VARLEN=varlen)
    if paired:
        _split.finish((o, *strides), part[rows * D :], work, (T, nsm, total), meta, 2 * rows * D)
        pieces = part.view(-1, 2, rows, D)[:, 1]
    else:
        _split.finish((o, *strides), part, work, (T, nsm, total), meta)
        pieces = part.view(-1, rows, D)
    for i, (b, h, m) in enumerate(ranked[-r:]):
        want = pieces[i * s] + pieces[i * s + 1]
        n = lens[b]
        start = sum(lens[:b]) if varlen else 0
        bb = 0 if varlen else b
        top = min(rows, n - m * rows)
        got = o[bb, start + m * rows : start + m * rows + top, h]
        torch.testing.assert_close(got, want[:top], rtol=0, atol=0)
        if not varlen:
            assert torch.all(o[b, m * rows + top : min(T, (m + 1) * rows), h] == 0), "padding rows not zeroed"
    for b, h, m in ranked[:-r]:  # tiles that ran whole: the finishing kernel leaves them alone
        start = sum(lens[:b]) if varlen else 0
        bb = 0 if varlen else b
        assert torch.isnan(o[bb, start + m * rows, h]).all(), f"tile {(b, h, m)} was written by the finish"


def test_a_plan_refuses_batches_it_cannot_hold():
    seq = torch.full((_split.PLAN_MAX_B + 1,), 10, dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"1 to {_split.PLAN_MAX_B} sequences, got B={_split.PLAN_MAX_B + 1}"):
        _split.plan(seq, False, 10, (_split.PLAN_MAX_B + 1, 1, 1, 4), 64)


def _backward(lens, H, K, D, dtype, varlen, planned, monkeypatch, seed=0):
    """(dq, dk, dv) of one backward through the public functions (dK/dV launch planned or the 2-D grid), with the
    inputs (fresh each seed) and the float64 reference's gradients."""
    import scfm_kernels as sk
    from scfm_kernels import _bwd

    monkeypatch.setattr(_bwd, "BWD_PLAN", planned)
    gen = torch.Generator().manual_seed(seed)
    T = max(lens)
    if varlen:
        n = sum(lens)
        q, k, v = (torch.randn(n, h, D, generator=gen).to(dtype) for h in (H, K, K))
        cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
        run = lambda *t: sk.sigmoid_attention_varlen(*t, cu, T)  # noqa: E731
        ref = lambda *t: sk.sigmoid_attention_varlen_reference(*t, cu, T)  # noqa: E731
    else:
        q, k, v = (torch.randn(len(lens), T, h, D, generator=gen).to(dtype) for h in (H, K, K))
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        run = lambda *t: sk.sigmoid_attention(*t, seq_lens)  # noqa: E731
        ref = lambda *t: sk.sigmoid_attention_reference(*t, seq_lens)  # noqa: E731
    go = torch.randn(q.shape, generator=gen).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(run(*leaves), leaves, go)
    r64 = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(ref(*r64), r64, go.double())
    return got, want


def _spy_plans(monkeypatch) -> list[list[int]]:
    """The tails (first split rank, split tiles, s) of the work tables the backward plans, read after it ran."""
    from scfm_kernels import _bwd

    tables = []
    real = _split.plan

    def spy(seq, varlen, t_max, dims, tile_rows, zero_all_heads=False):
        work = real(seq, varlen, t_max, dims, tile_rows, zero_all_heads)
        tables.append((work, _split.grid_size(dims[2], dims[0], dims[1], dims[3])))
        return work

    monkeypatch.setattr(_split, "plan", spy)
    monkeypatch.setattr(_bwd._split, "plan", spy)
    return tables


@pytest.mark.parametrize(
    ("varlen", "dtype", "D", "path"),
    [
        (False, torch.float32, 16, "recompute"),  # pointer loads
        (True, torch.bfloat16, 16, "recompute"),  # descriptor loads
        (False, torch.bfloat16, 112, "stored"),  # dSᵀ to the scratch, at each pair's place in it
    ],
)
def test_the_planned_backward_splits_the_last_key_blocks_and_matches(varlen, dtype, D, path, monkeypatch):
    """The dK/dV launch planned on the interpreter's 4 multiprocessors (`_split.CPU_SMS`): 12 + 9 key blocks of 16
    rows, so the last one runs in halves over the queries (the cost rule at 130 rows) and `_split.finish` adds
    their partials. GQA, an empty sequence, blocks past the ends, NaN-poisoned outputs: all three gradients match
    float64 and the 2-D grid's (within the partials' summation order), padding rows are exactly 0, and two planned
    runs agree to the bit."""
    from scfm_kernels import _bwd, _common

    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)
    paths = []
    real_pick = _bwd.pick_dq_path
    monkeypatch.setattr(_bwd, "pick_dq_path", lambda *a, **k: paths.append(real_pick(*a, **k)[0]) or real_pick(*a, **k))
    tables = _spy_plans(monkeypatch)
    lens, H, K = [192, 0, 130], 2, 1
    planned, want = _backward(lens, H, K, D, dtype, varlen, True, monkeypatch)
    assert paths == [path] and len(tables) == 1, (paths, len(tables))
    work, total = tables[0]
    row = int(_split.ROW)
    assert work[total * row :][:3].tolist() == [20, 1, 2], "not the last key block in halves"
    again, _ = _backward(lens, H, K, D, dtype, varlen, True, monkeypatch)
    whole, _ = _backward(lens, H, K, D, dtype, varlen, False, monkeypatch)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b, c, w in zip(("dq", "dk", "dv"), planned, again, whole, want):
        assert not torch.isnan(a).any(), f"{name}: NaN left by the planned launch (an element never written)"
        assert torch.equal(a, b), f"{name}: two planned runs differ"
        for got, what in ((a, "planned"), (c, "2-D grid")):
            err = ((got.double() - w).norm() / w.norm()).item()
            assert err < tol, f"{name} ({what}): relative error {err:.2e} against float64"
        assert ((a.double() - c.double()).norm() / c.double().norm()).item() < tol / 4, f"{name}: planned ≠ 2-D"
        if not varlen:
            for b_, n in enumerate(lens):
                assert torch.all(a[b_, n:] == 0), f"{name}[{b_}, {n}:] (padding) is not exactly 0"


def test_a_planned_backward_without_a_split_gives_the_2d_grids_gradients_bit_for_bit(monkeypatch):
    """Lengths 37, 0, 1 and 20 (12 key blocks: four full rounds, nothing split): the planned order alone changes
    no bit of any gradient."""
    tables = _spy_plans(monkeypatch)
    lens = [37, 0, 1, 20]
    planned, _ = _backward(lens, 4, 2, 16, torch.bfloat16, False, True, monkeypatch)
    work, total = tables[0]
    assert work[total * int(_split.ROW) + 1].item() == 0, "a key block was split"
    whole, _ = _backward(lens, 4, 2, 16, torch.bfloat16, False, False, monkeypatch)
    for name, a, b in zip(("dq", "dk", "dv"), planned, whole):
        assert torch.equal(a, b), f"{name}: planned and 2-D grid differ by {(a - b).abs().max():.3g}"
