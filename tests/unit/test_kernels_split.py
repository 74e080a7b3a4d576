"""The forward's tail split (`scfm_kernels._split`) under the interpreter: which program of a split launch runs
which part of which tile, and the kernel that adds the parts. The split forward itself runs on the GPU only
(Gluon): tests/gpu/test_kernels_gpu.py checks it against float64 with a small multiprocessor count forcing splits."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import triton
import triton.language as tl

from scfm_kernels import _split


@triton.jit
def _plan_probe(CUM, LENS, OUT, B, PER_SEQ, N_M, NSM, BLOCK_N: tl.constexpr, S_MAX: tl.constexpr):
    pid = tl.program_id(0)
    pair, m, part, s, piece = _split.tile_work(pid, CUM, B, PER_SEQ, N_M, NSM, S_MAX)
    n = tl.load(LENS + pair // PER_SEQ)
    lo, hi = _split.part_blocks(n, part, s, BLOCK_N, _split.KEY_UNIT)
    tl.store(OUT + pid * 7 + 0, pair)
    tl.store(OUT + pid * 7 + 1, m)
    tl.store(OUT + pid * 7 + 2, part)
    tl.store(OUT + pid * 7 + 3, s)
    tl.store(OUT + pid * 7 + 4, piece)
    tl.store(OUT + pid * 7 + 5, lo)
    tl.store(OUT + pid * 7 + 6, hi)


def _expected_s(r: int, nsm: int) -> int:
    """The most pieces per split tile that still run in one round."""
    return max(s for s in range(1, int(_split.S_MAX) + 1) if (r == 0 and s == 1) or 0 < r * s <= nsm)


def _plan(lens: list[int], per_seq: int, rows: int, nsm: int, block_n: int) -> tuple[torch.Tensor, int]:
    T = max(lens)
    n_m = triton.cdiv(T, rows)
    seq = torch.tensor(lens, dtype=torch.int32)
    cum = _split.tile_cumsum(seq, False, T, rows)
    grid = n_m * len(lens) * per_seq + nsm
    out = torch.full((grid, 7), -99, dtype=torch.int32)
    _plan_probe[(grid,)](cum, seq, out, len(lens), per_seq, n_m, nsm, BLOCK_N=block_n, S_MAX=_split.S_MAX)
    return out, n_m


@pytest.mark.parametrize("seed", range(10))
def test_every_tile_part_is_run_once_and_the_last_wave_is_split(seed):
    """Random lengths (empty sequences included), heads per sequence, tile heights and key blocks; the
    multiprocessor count is chosen so that most seeds split their last wave (s = 2, 3 or 4), one in four not."""
    rng = random.Random(seed)
    per_seq, rows, block_n = rng.choice([1, 2, 3]), rng.choice([64, 192]), rng.choice([64, 128])
    lens = [rng.choice([0, 1, 63, 64, 200, 383, 700, 1001, 1500]) for _ in range(rng.randint(1, 4))]
    lens[0] = max(lens[0], 1)
    tiles = [triton.cdiv(n, rows) for n in lens]
    ranked = [(b * per_seq + h, m) for b, t in enumerate(tiles) for h in range(per_seq) for m in range(t)]
    N = len(ranked)
    splitting = [k for k in range(2, N + 3) if _expected_s(N % k, k) > 1]
    nsm = rng.choice(splitting) if splitting and seed % 4 else rng.choice([5, 7, 13, 40])
    out, n_m = _plan(lens, per_seq, rows, nsm, block_n)
    r = N % nsm
    s = _expected_s(r, nsm)
    tail = set(ranked[N - r :]) if s > 1 else set()
    n_main = n_m * len(lens) * per_seq
    seen: dict[tuple[int, int, int], tuple[int, int, int]] = {}
    for pid, (pair, m, part, s_got, piece, lo, hi) in enumerate(out.tolist()):
        if pid < n_main:
            assert (pair, m) == (pid // n_m, pid % n_m), f"program {pid} left the 2-D grid's order"
        if piece == -2:
            assert pid >= n_main, f"program {pid} of the main grid does nothing"
            continue
        if piece == -1:
            assert (pair, m) not in tail and part == 0, f"program {pid}: tile {(pair, m)} is split but ran whole"
            n_blocks = triton.cdiv(lens[pair // per_seq], block_n)
            assert (s_got, lo, hi) == (1, 0, n_blocks), f"program {pid}: whole tile {(pair, m)} runs {lo}…{hi}"
            continue
        assert s_got == s, f"program {pid}: {s_got} parts, expected {s} (N={N}, r={r}, nsm={nsm})"
        assert (pair, m) in tail, f"program {pid}: tile {(pair, m)} is not in the last wave but ran in parts"
        key = (pair, m, part)
        assert key not in seen, f"part {key} ran twice (programs {seen[key]} and {pid})"
        seen[key] = (piece, lo, hi)
    assert set(seen) == {(p, m, k) for p, m in tail for k in range(s)}, "a part of a split tile never ran"
    assert sorted(v[0] for v in seen.values()) == list(range(len(tail) * s)), "partial slots are not 0 … r·s − 1"
    for pair, m in tail:
        blocks = [seen[(pair, m, k)][1:] for k in range(s)]
        n_blocks = triton.cdiv(lens[pair // per_seq], block_n)
        assert blocks[0][0] == 0 and blocks[-1][1] == n_blocks, f"tile {(pair, m)}: parts {blocks} miss keys"
        assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks)), f"tile {(pair, m)}: parts {blocks} overlap"


@pytest.mark.parametrize("varlen", [False, True])
def test_finish_adds_the_parts_in_order_and_zeroes_padding(varlen):
    """Partials of the split tiles added into the output; padding rows of a padded batch become 0, other rows
    untouched."""
    rows, D, H, nsm = 128, 16, 2, 7
    lens = [300, 130]  # 3 + 2 tiles per head: 10 tiles, r = 3 → s = 2 (one round of halves)
    B, T = len(lens), max(lens)
    if varlen:
        seq = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
        o = torch.full((1, sum(lens), H, D), float("nan"))
        strides = (0, o.stride(1), o.stride(2))
    else:
        seq = torch.tensor(lens, dtype=torch.int32)
        o = torch.full((B, T, H, D), float("nan"))
        strides = (o.stride(0), o.stride(1), o.stride(2))
    cum = _split.tile_cumsum(seq, varlen, T, rows)
    part = torch.randn(nsm * rows * D)
    _split.finish_fwd((o, *strides), part, cum, seq, (T, B, H, nsm), dict(TILE_ROWS=rows, HEAD_DIM=D, VARLEN=varlen))
    ranked = [(b * H + h, m) for b, n in enumerate(lens) for h in range(H) for m in range(triton.cdiv(n, rows))]
    r, s = len(ranked) % nsm, 2
    assert r == 3 and _expected_s(r, nsm) == s
    pieces = part.view(-1, rows, D)
    for i, (pair, m) in enumerate(ranked[-r:]):
        b, h = divmod(pair, H)
        want = pieces[i * s] + pieces[i * s + 1]
        n = lens[b]
        start = sum(lens[:b]) if varlen else 0
        bb = 0 if varlen else b
        top = min(rows, n - m * rows)
        got = o[bb, start + m * rows : start + m * rows + top, h]
        torch.testing.assert_close(got, want[:top], rtol=0, atol=0)
        if not varlen:
            assert torch.all(o[b, m * rows + top : min(T, (m + 1) * rows), h] == 0), "padding rows not zeroed"
    for pair, m in ranked[:-r]:  # tiles that ran whole: the finishing kernel leaves them alone
        b, h = divmod(pair, H)
        start = sum(lens[:b]) if varlen else 0
        bb = 0 if varlen else b
        assert torch.isnan(o[bb, start + m * rows, h]).all(), f"tile {(pair, m)} was written by the finish"
