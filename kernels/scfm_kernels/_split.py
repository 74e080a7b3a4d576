"""Planned launches: longest sequences first, empty tiles last, and the last round's tiles split in parts. The
warp-specialized forward's query tiles split along the keys; the backward's dK/dV key blocks (tiles of key rows,
H counted as key heads) split along the queries (`_bwd._dkdv_plan`), their partial dK and dV added by `_finish`
as the forward's partial outputs are.

A launch of N equal tiles on NSM multiprocessors (one program each at a time) runs ⌈N/NSM⌉ rounds, the last with
only r = N mod NSM busy: at D = 128 a 16K sequence's 1376 forward tiles run 10.4 rounds in the time of 11, and a
9,896-token one's 832 tiles 6.3 in the time of 7. The H200's own schedule, read from per-program timer stamps
(docs/benchmarks.md, run 17), showed the whole-tile launch at 0.946–0.963 of its busy time spread evenly over the
multiprocessors on dense batches and at 0.885–0.907 on 50%-padded ones. Sigmoid attention needs no running max or
row sums, so a tile's output is a plain sum over its keys: the last r tiles each run as s pieces over s parts of
their keys, their float32 partial outputs go to a scratch buffer, and `_finish` adds the s parts in a fixed
order (deterministic) into the output.

`_plan_kernel` writes the launch's work table on the device (no host sync): one row per program of a 1-D grid of
N_M·B·H + (S_MAX − 1)·NSM programs, in this order:
  - the whole tiles, sequences longest first (a stable order by length, so that the last round holds the shortest
    tiles), then heads, then query tiles;
  - the r·s pieces of the last r tiles (tile by tile, part by part); s ∈ 1 … S_MAX, the smallest that minimises
    ⌈r·s/NSM⌉·(2⌈u/s⌉ + C_FIX), u the keys of the last round's longest tile (the first of the last r) in
    KEY_UNITs (two 64-key blocks each) and C_FIX a tile's fixed cost in 64-key blocks, so pieces may take more
    than one round (r = 88 of 132 tiles of 4K keys: s = 3, two rounds of thirds);
  - the tiles past each sequence's end (padded layout only), which only write zeros, where multiprocessors
    idle at the end instead of between real tiles: one per (sequence, head, tile), or with ZERO_ALL_HEADS (the
    forward) one per (sequence, tile) that writes the tile's rows of every head (h = 0), H times fewer programs;
  - programs with nothing to do.
Row of program i (int32 × ROW): b, h, m (query tile), part, parts, piece (−1: the tile whole, or zeros past the
end of one head; −3: zeros past the end of every head; ≥ 0: scratch slot of a partial; −2: nothing), n (the
sequence's length), start (its first row when packed).
After the last row: (first split rank, split tiles, s), for `_finish`.

Batches of more than PLAN_MAX_B sequences run the plain 2-D grid (`_fwd_ws.launch`, `_bwd._dkdv_plan`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._tile import bias_term

S_MAX = tl.constexpr(4)  # most pieces per tile
KEY_UNIT = tl.constexpr(128)  # keys per part are a multiple of this (of every launch's key block)
C_FIX = tl.constexpr(6.0)  # a tile's fixed cost (its Q landing, its epilogue: ≈ 7 µs, run 17) in 64-key blocks
ROW = tl.constexpr(8)  # int32 fields per program in the work table
PLAN_MAX_B = 64  # sequences per batch up to which launches are planned


@triton.jit
def _gather(onehot, values):
    """values[j] for each row's one-hot column j: onehot [P, BB] bool, values [BB] → [P]."""
    return tl.sum(tl.where(onehot, values[None, :], 0), 1)


@triton.jit
def _plan_kernel(
    SEQ, WORK, B, H, N_M, NSM, T_MAX, TOTAL,
    VARLEN: tl.constexpr, TILE_ROWS: tl.constexpr, S_MAX: tl.constexpr, C_FIX: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, ZERO_ALL_HEADS: tl.constexpr,
):  # fmt: skip
    """Rows [pid·BLOCK_P, + BLOCK_P) of the work table (module docstring); every program derives the whole plan from
    the B lengths (B ≤ BLOCK_B)."""
    bi = tl.arange(0, BLOCK_B)
    ok = bi < B
    if VARLEN:
        row0 = tl.load(SEQ + bi, mask=ok, other=0)
        n = tl.load(SEQ + bi + 1, mask=ok, other=0) - row0
    else:
        row0 = bi * 0
        n = tl.minimum(tl.load(SEQ + bi, mask=ok, other=0), T_MAX)
    n = tl.where(ok, tl.maximum(n, 0), 0)
    # Packed: a max_seqlen below a sequence's length covers only its first N_M tiles, as the 2-D grid does.
    tiles = tl.minimum((n + TILE_ROWS - 1) // TILE_ROWS, N_M)
    # Slot of each sequence in the launch: the sequences before it are the longer ones and the equally long ones of
    # lower index (entries past B, of length 0, keep their own index and count for no valid sequence).
    earlier = (n[None, :] > n[:, None]) | ((n[None, :] == n[:, None]) & (bi[None, :] < bi[:, None]))
    slot = tl.sum(earlier.to(tl.int32), 1)
    by_slot = slot[None, :] == bi[:, None]  # [slot, b]
    seq_of = _gather(by_slot, bi)
    n_s = _gather(by_slot, n)
    t_s = _gather(by_slot, tiles)
    row0_s = _gather(by_slot, row0)
    whole_s = t_s * H
    cum = tl.cumsum(whole_s, 0)  # valid tiles up to and including each slot
    N = tl.sum(whole_s, 0)
    empty_s = bi * 0 if VARLEN else tl.where(bi < B, (N_M - t_s) * (1 if ZERO_ALL_HEADS else H), 0)
    cum_e = tl.cumsum(empty_s, 0)
    E = tl.sum(empty_s, 0)
    # Pieces per split tile: the fewest that minimise the modelled time of the last r tiles.
    r = N % NSM
    # The last round's time is its longest tile's: the first of the last r (sequences run longest first).
    head = tl.minimum(tl.sum((cum <= N - r).to(tl.int32), 0), tl.maximum(B - 1, 0))
    units = (tl.sum(tl.where(bi == head, n_s, 0), 0) + 127) // 128
    best_s = 1
    best = (2 * units + C_FIX) * 1.0
    for s_try in tl.static_range(2, S_MAX + 1):
        cost = ((r * s_try + NSM - 1) // NSM) * (2 * ((units + s_try - 1) // s_try) + C_FIX)
        better = cost < best - 1e-3
        best_s = tl.where(better, s_try, best_s)
        best = tl.where(better, cost, best)
    s = tl.where(r > 0, best_s, 1)
    first = tl.where(s > 1, N - r, N)
    pieces = tl.where(s > 1, r * s, 0)

    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    is_whole = p < first
    is_piece = (p >= first) & (p < first + pieces)
    e = p - first - pieces
    is_empty = (e >= 0) & (e < E)
    rank = tl.where(is_whole, p, first + (p - first) // s)
    at = tl.where(is_empty, tl.sum((cum_e[None, :] <= e[:, None]).to(tl.int32), 1),
                  tl.sum((cum[None, :] <= rank[:, None]).to(tl.int32), 1))  # fmt: skip
    at = tl.minimum(at, tl.maximum(B - 1, 0))
    sel = bi[None, :] == at[:, None]
    t_p = _gather(sel, t_s)
    rem = tl.where(is_empty, e - _gather(sel, cum_e - empty_s), rank - _gather(sel, cum - whole_s))
    per_head = tl.maximum(tl.where(is_empty, N_M - t_p, t_p), 1)
    h = rem // per_head
    m = rem % per_head + tl.where(is_empty, t_p, 0)
    part = tl.where(is_piece, (p - first) % s, 0)
    piece = tl.where(is_piece, p - first, tl.where(is_whole, -1, tl.where(is_empty, -3 if ZERO_ALL_HEADS else -1, -2)))
    busy = is_whole | is_piece | is_empty
    fields = (_gather(sel, seq_of), tl.where(busy, h, 0), tl.where(busy, m, 0), part, tl.where(is_piece, s, 1), piece,
              _gather(sel, n_s), _gather(sel, row0_s))  # fmt: skip
    out = WORK + p.to(tl.int64) * ROW
    for j in tl.static_range(ROW):
        tl.store(out + j, fields[j], mask=p < TOTAL)
    if tl.program_id(0) == 0:
        tail = WORK + TOTAL.to(tl.int64) * ROW
        tl.store(tail, first)
        tl.store(tail + 1, pieces // s)
        tl.store(tail + 2, s)


@triton.jit
def work_item(WORK, pid):
    """(b, h, m, part, parts, piece, n, start) of program pid of a planned launch (module docstring)."""
    row = WORK + pid.to(tl.int64) * ROW
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5),
            tl.load(row + 6), tl.load(row + 7).to(tl.int64))  # fmt: skip


@triton.jit
def key_work(WORK, BIAS, pid, N_TILES):
    """What program pid of a planned key-side launch (the backward's dK/dV over (batch, key head) pairs, split
    along the queries) works on: (b, key head, key tile, part, parts, piece, the sequence's first row and length,
    −bias·log2 e). A program with nothing to do gets length 0 and key tile N_TILES, past the last (whose rows
    start past T_MAX): it loads and stores nothing. Piece −3: a key tile past the end for every key head (h = 0)."""
    b, hk, m, part, parts, piece, n, start = work_item(WORK, pid)
    idle = piece == -2
    b = b.to(tl.int64)
    return b, hk, tl.where(idle, N_TILES, m), part, parts, piece, start, tl.where(idle, 0, n), bias_term(BIAS, b)


@triton.jit
def part_blocks(n, part, s, BLOCK_N: tl.constexpr, KEY_UNIT: tl.constexpr):
    """Key blocks [lo, hi) of part `part` of s of a sequence of n keys (parts in whole KEY_UNITs)."""
    units = tl.cdiv(n, KEY_UNIT)
    per: tl.constexpr = KEY_UNIT // BLOCK_N
    lo = (part * units // s) * per
    hi = tl.minimum(((part + 1) * units // s) * per, tl.cdiv(n, BLOCK_N))
    return lo, tl.maximum(hi, lo)


@triton.jit
def _finish(
    O, PART, WORK, TOTAL,
    stride_ob, stride_ot, stride_oh,
    T_MAX, PIECE_STRIDE,
    TILE_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    """Output rows of the split tiles (O: the forward's output, or the backward's dK or dV): program (i, j) adds the
    s float32 partials of rows [j·ROWS, + ROWS) of split tile i (piece k at PART + k·PIECE_STRIDE, its rows
    HEAD_DIM apart) in part order and writes them, zeros past the sequence's end, as the kernels do."""
    i = tl.program_id(0)
    tail = WORK + TOTAL.to(tl.int64) * ROW
    first = tl.load(tail)
    split = tl.load(tail + 1)
    s = tl.load(tail + 2)
    if i < split:
        b, h, m, _, _, _, n, start = work_item(WORK, first + i * s)
        b = b.to(tl.int64)
        local = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = (offs_d < HEAD_DIM)[None, :]
        part_ptrs = PART + (i * s).to(tl.int64) * PIECE_STRIDE + local[:, None] * HEAD_DIM + offs_d[None, :]
        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
        for p in range(s):
            acc += tl.load(part_ptrs + p * PIECE_STRIDE, mask=d_ok, other=0.0)
        rows = m * TILE_ROWS + local
        acc = tl.where((rows < n)[:, None], acc, 0.0)
        o_ptrs = O + b * stride_ob + start * stride_ot + h * stride_oh
        o_ptrs += rows[:, None].to(tl.int64) * stride_ot + offs_d[None, :]
        store_rows = rows < n if VARLEN else rows < T_MAX
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=store_rows[:, None] & d_ok)


CPU_SMS = 4  # what a planned launch under the interpreter (CPU tensors) takes the multiprocessor count for


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; CPU_SMS for a CPU one (the interpreter)."""
    if device.type != "cuda":
        return CPU_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def grid_size(n_m: int, B: int, H: int, nsm: int) -> int:
    """Programs of a planned launch: every (tile, pair), and room for the pieces after the first of each split tile
    (r·(s − 1) < (S_MAX − 1)·NSM)."""
    return n_m * B * H + (int(S_MAX) - 1) * nsm


def plan(
    seq: torch.Tensor,
    varlen: bool,
    t_max: int,
    dims: tuple[int, int, int, int],
    tile_rows: int,
    zero_all_heads: bool = False,
) -> torch.Tensor:
    """The work table of a planned launch (module docstring), on seq's device without a host sync: int32
    [grid_size · ROW + ROW]. seq: seq_lens [B] (clamped to t_max) or cu_seqlens [B + 1]; dims (B, H, N_M, NSM)
    with H the heads the tiles are counted over (the backward's: key heads); zero_all_heads: one program per
    padded tile past a sequence's end for all heads (piece −3) instead of one per head."""
    B, H, n_m, nsm = dims
    if not 1 <= B <= PLAN_MAX_B:
        raise ValueError(f"a planned launch takes 1 to {PLAN_MAX_B} sequences, got B={B}")
    total = grid_size(n_m, B, H, nsm)
    work = torch.empty((total + 1) * int(ROW), dtype=torch.int32, device=seq.device)
    block_b = max(16, triton.next_power_of_2(B))
    block_p = max(32, 4096 // block_b)
    _plan_kernel[(triton.cdiv(total, block_p),)](
        seq, work, B, H, n_m, nsm, t_max, total,
        VARLEN=varlen, TILE_ROWS=tile_rows, S_MAX=S_MAX, C_FIX=C_FIX, BLOCK_B=block_b, BLOCK_P=block_p,
        ZERO_ALL_HEADS=zero_all_heads, num_warps=8 if block_b >= 64 else 4,
    )  # fmt: skip
    return work


class Plan(NamedTuple):
    """A planned launch: its work table, the split tiles' float32 partials, its grid size, the multiprocessors it
    was planned for and its rows per tile."""

    work: torch.Tensor
    part: torch.Tensor
    total: int
    nsm: int
    rows: int


def prepare(
    seq: torch.Tensor,
    varlen: bool,
    t_max: int,
    dims: tuple[int, int, int],
    rows: int,
    piece_rows: int,
    head_dim: int,
    zero_all_heads: bool = False,
) -> Plan:
    """Everything a planned launch needs, on seq's device: the work table (`plan`, zero_all_heads as there) for
    dims (B, heads, tiles per sequence) of `rows` rows each, and scratch for partials of piece_rows × head_dim
    float32 values per piece (the forward's: one tile; the backward's: a key block's dK and dV)."""
    B, H, n_m = dims
    nsm = num_sms(seq.device)
    work = plan(seq, varlen, t_max, (B, H, n_m, nsm), rows, zero_all_heads)
    return Plan(work, scratch(nsm, piece_rows, head_dim, seq.device), grid_size(n_m, B, H, nsm), nsm, rows)


def scratch(nsm: int, tile_rows: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """Float32 partials of the split tiles: r·s < S_MAX·NSM pieces (r < NSM tiles of at most S_MAX parts) of
    [tile_rows, head_dim]."""
    return torch.empty(int(S_MAX) * nsm * tile_rows * head_dim, dtype=torch.float32, device=device)


def finish(
    o_args: tuple, part: torch.Tensor, work: torch.Tensor, dims: tuple, meta: dict, piece_stride: int | None = None
) -> None:
    """Launches `_finish` after a planned launch: o_args (O, stride_ob, stride_ot, stride_oh), dims (T_MAX, NSM,
    grid size), meta (TILE_ROWS, HEAD_DIM, VARLEN); piece_stride: float32 values from one piece's partial to the
    next (default TILE_ROWS·HEAD_DIM: pieces back to back)."""
    o, sb, st, sh = o_args
    t_max, nsm, total = dims
    rows = min(64, meta["TILE_ROWS"])
    grid = (nsm, meta["TILE_ROWS"] // rows)
    stride = meta["TILE_ROWS"] * meta["HEAD_DIM"] if piece_stride is None else piece_stride
    block_d = triton.next_power_of_2(meta["HEAD_DIM"])
    _finish[grid](o, part, work, total, sb, st, sh, t_max, stride, BLOCK_D=block_d, ROWS=rows, **meta)
