"""Tail splitting: the last, partly empty wave of a launch's tiles split along the keys.

A launch of N equal tiles on NSM multiprocessors (one program each at a time) runs ⌈N/NSM⌉ waves, the last with
only r = N mod NSM busy: at D = 128 a 16K sequence's 1376 forward tiles run 10.4 waves in the time of 11, and a
9,896-token one's 832 tiles 6.3 in the time of 7 (docs/benchmarks.md, run 16). Sigmoid attention needs no running
max or row sums, so a tile's output is a plain sum over its keys: the last r tiles (in launch order) each run as s
pieces over s parts of their keys, their float32 partial outputs go to a scratch buffer, and `_finish_fwd` adds the s
parts in a fixed order (deterministic) into the output.

s is the most pieces that still run in one round, ⌊NSM/r⌋ capped at S_MAX: r = 40 → s = 3 (120 pieces of a third),
r = 56 → 2, r > NSM/2 → 1 (no split); the scratch then holds at most NSM pieces.

Layout of the launch (`tile_work`): a 1-D grid of N_M·PAIRS programs, one per (pair, tile) with the tile index
fastest, as the 2-D grid it replaces, then NSM programs for the pieces after the first of each split tile
(r·(s − 1) ≤ NSM − r of them; those not needed do nothing). CUM int32 [B] holds the running sum of each sequence's
tile count (⌈nᵢ/TILE_ROWS⌉), a pair is b·PER_SEQ + head, and a tile's rank is its position among the valid tiles in
launch order.

Opt-in (SCFM_KERNELS_TAIL_SPLIT=1, `_fwd_ws`). Measured on the H200 (docs/benchmarks.md, run 16): +1–3% at L = 8K
and 16K, dense and 50% padded; level on the 160M trainer's batch; 3–9% slower at L = 4K, also where nothing is
split (r > NSM/2). A likely cause, not yet measured: every program now runs `tile_work` (dependent scalar loads,
the binary search included) before its first copy, which a 4K tile (~90 µs) feels more than a 16K one.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._tile import seq_bounds

S_MAX = tl.constexpr(4)  # most pieces per tile
KEY_UNIT = tl.constexpr(128)  # keys per part are a multiple of this (of every launch's key block)


@triton.jit
def split_plan(CUM, B, PER_SEQ, NSM, S_MAX: tl.constexpr):
    """(N valid tiles, rank of the first split tile N − r, pieces per split tile s; s = 1: no split)."""
    N = PER_SEQ * tl.load(CUM + B - 1)
    r = N % NSM
    s = tl.minimum(NSM // tl.maximum(r, 1), S_MAX)
    return N, N - r, tl.where(r > 0, s, 1)


@triton.jit
def seq_tiles(CUM, b):
    """(tiles of sequence b, valid tiles of the sequences before it)."""
    upto = tl.load(CUM + b)
    before = tl.load(CUM + b - 1, mask=b > 0, other=0)
    return upto - before, before


@triton.jit
def tile_of_rank(CUM, B, PER_SEQ, rank):
    """(pair, tile index in its sequence) of the valid tile of this rank: binary search of CUM."""
    lo = rank * 0
    hi = lo + B - 1
    while lo < hi:
        mid = (lo + hi) // 2
        left = PER_SEQ * tl.load(CUM + mid) > rank
        hi = tl.where(left, mid, hi)
        lo = tl.where(left, lo, mid + 1)
    t_b, before = seq_tiles(CUM, lo)
    rem = rank - PER_SEQ * before
    t_b = tl.maximum(t_b, 1)  # (no valid tile at all: rank 0 maps to a pair of the last sequence)
    return lo * PER_SEQ + rem // t_b, rem % t_b


@triton.jit
def tile_work(pid, CUM, B, PER_SEQ, N_M, NSM, S_MAX: tl.constexpr):
    """What program pid of a tail-split launch does: (pair, tile index m, part, parts, piece). piece −1: the
    whole tile (parts 1), written to the output as usual (also a tile past its sequence's end, which writes zeros);
    piece ≥ 0: part `part` of the s parts of the tile's keys, a float32 partial to scratch slot `piece`; piece −2:
    nothing."""
    N, first, s = split_plan(CUM, B, PER_SEQ, NSM, S_MAX)
    n_main = N_M * B * PER_SEQ
    # One of the programs in the (pair, tile) order of a 2-D grid.
    pair = pid // N_M
    m = pid % N_M
    b = tl.minimum(pair // PER_SEQ, B - 1)
    t_b, before = seq_tiles(CUM, b)
    rank = PER_SEQ * before + (pair % PER_SEQ) * t_b + m
    tail = (pid < n_main) & (m < t_b) & (rank >= first) & (s > 1)
    piece = tl.where(tail, (rank - first) * s, -1)
    # A later piece (1 … s − 1) of a split tile.
    e = pid - n_main
    s1 = tl.maximum(s - 1, 1)
    extra = (e >= 0) & (s > 1) & (e < (N - first) * (s - 1))
    i = tl.where(extra, e // s1, 0)
    pair_e, m_e = tile_of_rank(CUM, B, PER_SEQ, tl.minimum(first + i, tl.maximum(N - 1, 0)))
    pair = tl.where(pid < n_main, pair, pair_e)  # (a program with nothing to do gets a real pair to read)
    m = tl.where(pid < n_main, m, m_e)
    part = tl.where(extra, 1 + e % s1, 0)
    piece = tl.where(extra, i * s + part, tl.where(pid < n_main, piece, -2))
    return pair, m, part, tl.where(piece >= 0, s, 1), piece


@triton.jit
def part_blocks(n, part, s, BLOCK_N: tl.constexpr, KEY_UNIT: tl.constexpr):
    """Key blocks [lo, hi) of part `part` of s of a sequence of n keys (parts in whole KEY_UNITs)."""
    units = tl.cdiv(n, KEY_UNIT)
    per: tl.constexpr = KEY_UNIT // BLOCK_N
    lo = (part * units // s) * per
    hi = tl.minimum(((part + 1) * units // s) * per, tl.cdiv(n, BLOCK_N))
    return lo, tl.maximum(hi, lo)


@triton.jit
def _finish_fwd(
    O, PART, CUM, SEQ,
    stride_ob, stride_ot, stride_oh,
    T_MAX, B, H, NSM,
    TILE_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, S_MAX: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    """Output rows of the split tiles: program (i, j) adds the s partials of rows [j·ROWS, + ROWS) of split tile i
    in part order and writes them (zeros past the sequence's end, as the forward kernels)."""
    i = tl.program_id(0)
    N, first, s = split_plan(CUM, B, H, NSM, S_MAX)
    if (s > 1) & (i < N - first):
        pair, m = tile_of_rank(CUM, B, H, first + i)
        b = (pair // H).to(tl.int64)
        start, n = seq_bounds(SEQ, b, T_MAX, VARLEN)
        local = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        offs_d = tl.arange(0, HEAD_DIM)
        part_ptrs = PART + (i * s).to(tl.int64) * (TILE_ROWS * HEAD_DIM) + local[:, None] * HEAD_DIM + offs_d[None, :]
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        for p in range(s):
            acc += tl.load(part_ptrs + p * (TILE_ROWS * HEAD_DIM))
        rows = m * TILE_ROWS + local
        acc = tl.where((rows < n)[:, None], acc, 0.0)
        o_ptrs = O + b * stride_ob + start * stride_ot + (pair % H) * stride_oh
        o_ptrs += rows[:, None] * stride_ot + offs_d[None, :]
        store_rows = rows < n if VARLEN else rows < T_MAX
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=store_rows[:, None])


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device."""
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tile_cumsum(seq: torch.Tensor, varlen: bool, t_max: int, tile_rows: int) -> torch.Tensor:
    """CUM int32 [B]: running sum of ⌈nᵢ/tile_rows⌉ over the sequences (lengths from seq_lens clamped to t_max,
    or from cu_seqlens), on seq's device without a host sync."""
    n = (seq[1:] - seq[:-1]) if varlen else seq.clamp(max=t_max)
    return torch.cumsum((n + tile_rows - 1) // tile_rows, 0, dtype=torch.int32)


def scratch(nsm: int, tile_rows: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """Float32 partials of the split tiles: at most nsm pieces (r·s ≤ NSM) of [tile_rows, head_dim]."""
    return torch.empty(nsm * tile_rows * head_dim, dtype=torch.float32, device=device)


def finish_fwd(o_args: tuple, part: torch.Tensor, cum: torch.Tensor, seq: torch.Tensor, dims: tuple, meta: dict):
    """Launches `_finish_fwd` after a split forward: o_args (O, stride_ob, stride_ot, stride_oh), dims (T_MAX, B,
    H, NSM), meta (TILE_ROWS, HEAD_DIM, VARLEN)."""
    o, sb, st, sh = o_args
    t_max, B, H, nsm = dims
    rows = 64
    grid = (nsm, meta["TILE_ROWS"] // rows)
    _finish_fwd[grid](o, part, cum, seq, sb, st, sh, t_max, B, H, nsm, ROWS=rows, S_MAX=S_MAX, **meta)
