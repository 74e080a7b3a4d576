"""Backward kernels. With P = sigmoid(S), S = Q Kᵀ · scale + b and O = P V:

    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = dP ⊙ P ⊙ (1 − P),   dQ = scale · dS K,   dK = scale · dSᵀ Q.

Sigmoid rows are not normalised, so unlike softmax there is no row statistic to save or row-sum term to
subtract: both kernels recompute P from Q and K. The backward is deterministic by default: one kernel owns a
key block and loops over every query block of every query head in its GQA group (dK, dV); the other owns a
query block and loops over the key blocks (dQ). Each output element is written once by one program, no
atomics. At head dims 97-128 (16-bit inputs on tensor-descriptor hardware) the dK/dV kernel also stores each
pair's 16-bit dSᵀ tile in a bounded scratch buffer and `_dq_ds_kernel` streams it once against K instead of the
dQ kernel recomputing S, P and dP (`pick_dq_path`; 4-11% faster at D = 128 on the H200, slower at D = 64); on
Hopper the warp-specialized dK/dV kernel (`_bwd_ws`) serves that path, at D = 64 too.
By default the dK/dV launch is planned where its key block is known before it starts (the warp-specialized
kernel, a fixed launch): one program per row of `_split.plan`'s work table, longest sequences first, the last
round's key blocks in 2-4 parts over the queries with float32 partial dK and dV that `_split.finish` adds in a
fixed order (deterministic), the blocks past the ends last: 1.03-1.08x the 2-D grid's backward at D = 128 on the
H200 (docs/benchmarks.md, run 19); SCFM_KERNELS_BWD_PLAN=0 keeps the 2-D grid.
Opt-in (`deterministic=False`, 16-bit inputs on tensor-descriptor hardware): one pass, the dK/dV kernel also
computes each pair's dQ share and adds it into a float32 buffer with one bulk tensor reduce per
tile (element atomics under the CPU interpreter, which has no bulk reduce); 5 tile products per pair, not 7. On
Hopper at `_bwd_ws.ONE_PASS_HEAD_DIMS` (64) the warp-specialized dK/dV kernel serves it (ONE_PASS): 1.02-1.04x
the stored path there (run 25).

Shape key: B batch, T padded length (or the longest packed sequence), H query heads, K key/value heads,
D head dim, BD head dim padded to a power of two.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from . import _bwd_ws, _split
from ._common import (
    AUTOTUNE,
    INTERPRET,
    block_d,
    dot_mode,
    ds_scratch_bytes,
    len_bucket,
    new_output,
    set_descriptor_allocator,
    tma_ok,
)
from ._split import KEY_UNIT, key_work, part_blocks
from ._tile import LOG2E, key_head, mma, query_head, seq_bounds, sigmoid_parts

# The stored-dS path's dK/dV kernel: the warp-specialized one (`_bwd_ws`) where it can run, which measured 7-12%
# faster over the whole backward at D = 128 (docs/benchmarks.md, run 15); SCFM_KERNELS_BWD=triton keeps the
# Triton kernel of this module.
BWD_KERNEL = os.environ.get("SCFM_KERNELS_BWD", "ws")
# The dK/dV launch planned (`_dkdv_plan`: longest sequences first, the last round's key blocks split over the
# queries) by default, 1.03-1.08x the 2-D grid's backward (run 19); SCFM_KERNELS_BWD_PLAN=0 keeps the 2-D grid.
BWD_PLAN = os.environ.get("SCFM_KERNELS_BWD_PLAN", "1") != "0"


@triton.jit
def _dkdv_tile(dk, dv, k, v, q, do, neg_scale_log2e, bias_log2, DOT_MODE: tl.constexpr, SIG: tl.constexpr = 1):
    """One (query block, key block) pair's dK (unscaled) and dV contributions, from loaded tiles; also dSᵀ
    in the input dtype [BLOCK_N, BLOCK_M] for the one-pass backward's dQ product."""
    sT = mma(k, tl.trans(q), None, DOT_MODE)
    dpT = mma(v, tl.trans(do), None, DOT_MODE)
    pT, eT = sigmoid_parts(sT * neg_scale_log2e + bias_log2, DOT_MODE == 1, SIG)
    dv = mma(pT.to(do.dtype), do, dv, DOT_MODE)
    dsT = (pT * (eT * pT) * dpT).to(q.dtype)  # dP ⊙ P ⊙ (1 − P), 1 − P = e·P
    dk = mma(dsT, q, dk, DOT_MODE)
    return dk, dv, dsT


@triton.jit
def _dq_tile(dq, q, do, k, v, neg_scale_log2e, bias_log2, DOT_MODE: tl.constexpr, SIG: tl.constexpr = 1):
    """One (query block, key block) pair's dQ contribution (unscaled), from loaded tiles."""
    s = mma(q, tl.trans(k), None, DOT_MODE)
    dp = mma(do, tl.trans(v), None, DOT_MODE)
    p, e = sigmoid_parts(s * neg_scale_log2e + bias_log2, DOT_MODE == 1, SIG)
    ds = p * (e * p) * dp
    return mma(ds.to(k.dtype), k, dq, DOT_MODE)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, q_ptrs, do_ptrs, start_m, n_rows, offs_m, mask_d, neg_scale_log2e, bias_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr, MASKED: tl.constexpr,
    SIG: tl.constexpr = 1,
):  # fmt: skip
    """One query block's contribution to a key block's dK (unscaled) and dV; MASKED for the last block."""
    row_ok = (start_m + offs_m) < n_rows
    if MASKED:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & mask_d[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & mask_d[None, :], other=0.0)
    elif HEAD_DIM == BLOCK_D:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
    else:
        q = tl.load(q_ptrs, mask=mask_d[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=mask_d[None, :], other=0.0)
    sT = mma(k, tl.trans(q), None, DOT_MODE)
    pT, eT = sigmoid_parts(sT * neg_scale_log2e + bias_log2, DOT_MODE == 1, SIG)
    if MASKED:
        pT = tl.where(row_ok[None, :], pT, 0.0)
    dv = mma(pT.to(do.dtype), do, dv, DOT_MODE)
    dpT = mma(v, tl.trans(do), None, DOT_MODE)
    dsT = pT * (eT * pT) * dpT
    dk = mma(dsT.to(q.dtype), q, dk, DOT_MODE)
    return dk, dv


@triton.jit
def _dq_block(
    dq, q, do, k_ptrs, v_ptrs, start_n, n_keys, offs_n, mask_d, neg_scale_log2e, bias_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_MODE: tl.constexpr, MASKED: tl.constexpr,
    SIG: tl.constexpr = 1,
):  # fmt: skip
    """One key block's contribution to a query block's dQ (unscaled); MASKED for the last block."""
    col_ok = (start_n + offs_n) < n_keys
    if MASKED:
        k = tl.load(k_ptrs, mask=col_ok[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & mask_d[None, :], other=0.0)
    elif HEAD_DIM == BLOCK_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    s = mma(q, tl.trans(k), None, DOT_MODE)
    dp = mma(do, tl.trans(v), None, DOT_MODE)
    p, e = sigmoid_parts(s * neg_scale_log2e + bias_log2, DOT_MODE == 1, SIG)
    if MASKED:
        p = tl.where(col_ok[None, :], p, 0.0)
    ds = p * (e * p) * dp
    return mma(ds.to(k.dtype), k, dq, DOT_MODE)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, DQA, DS, SEQ, BIAS,
    neg_scale_log2e, scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_dqab, stride_dqat, stride_dqah,
    stride_dsh, stride_dsn,
    T_MAX, HK, PAIR0, WORK, PART,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, DOT_MODE: tl.constexpr, USE_TMA: tl.constexpr, LEN_BUCKET: tl.constexpr = 0,
    ATOMIC_DQ: tl.constexpr = 0, SIG: tl.constexpr = 1, STORE_DS: tl.constexpr = 0, PLANNED: tl.constexpr = 0,
):  # fmt: skip
    """PLANNED=0: a 2-D grid (key block, pair), pairs [PAIR0, PAIR0 + grid[1]), WORK and PART unused; PLANNED=1:
    program i does row i of the work table WORK (`_split.plan` over every pair of the batch: longest sequences
    first, the last round's key blocks in parts over the queries, key blocks past the ends last), PAIR0 = 0; a
    part writes float32 partial dK (scaled) and dV to PART (`_split.finish` adds them)."""
    if PLANNED:
        b, hk, pid_n, part, n_parts, piece, start, n, bias_log2 = key_work(
            WORK, BIAS, tl.program_id(0), tl.cdiv(T_MAX, BLOCK_N)
        )
        pair = b * HK + hk
        qb0, qb1 = part_blocks(n, part, n_parts, BLOCK_M, KEY_UNIT)
        store_heads = tl.where(piece == -3, HK, 1)  # a key block past the end for every key head: its zeros
    else:
        pid_n = tl.program_id(0)
        pair = tl.program_id(1)
        b, hk, start, n, bias_log2 = key_head(SEQ, BIAS, pair + PAIR0, HK, T_MAX, VARLEN)
        piece, qb0, qb1 = -1, 0, tl.cdiv(n, BLOCK_M)
        store_heads = 1

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    key_ok = offs_n < n

    kv_mask = key_ok[:, None] & mask_d[None, :]
    k_ptrs = K + b * stride_kb + start * stride_kt + hk * stride_kh
    k = tl.load(k_ptrs + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v_ptrs = V + b * stride_vb + start * stride_vt + hk * stride_vh
    v = tl.load(v_ptrs + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # A key block past the sequence's end loads no queries; it only writes zeros (padded layout). Query rows
    # [m_lo, m_hi): this program's part of the sequence's.
    n_rows = tl.where(pid_n * BLOCK_N < n, n, 0)
    n_full = (n_rows // BLOCK_M) * BLOCK_M
    m_lo = qb0 * BLOCK_M
    m_hi = tl.minimum(qb1 * BLOCK_M, n_rows)
    full_hi = tl.maximum(tl.minimum(m_hi, n_full), m_lo)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + start * stride_qt + h * stride_qh
        do_base = DO + b * stride_dob + start * stride_dot + h * stride_doh
        if USE_TMA:
            # Descriptors bounded to the sequence's n rows: rows past n arrive as zeros, so q = dO = 0 there
            # and those rows add nothing to dK or dV; no block needs a mask.
            q_desc = tl.make_tensor_descriptor(
                q_base, shape=[tl.maximum(n, 1), HEAD_DIM], strides=[stride_qt, 1], block_shape=[BLOCK_M, BLOCK_D]
            )
            do_desc = tl.make_tensor_descriptor(
                do_base, shape=[tl.maximum(n, 1), HEAD_DIM], strides=[stride_dot, 1], block_shape=[BLOCK_M, BLOCK_D]
            )
            dqa_base = DQA + b * stride_dqab + start * stride_dqat + h * stride_dqah
            if ATOMIC_DQ == 2:
                # float32 accumulator read through a descriptor: rows past n are dropped by the bulk reduce.
                dqa_desc = tl.make_tensor_descriptor(
                    dqa_base, shape=[tl.maximum(n, 1), HEAD_DIM], strides=[stride_dqat, 1],
                    block_shape=[BLOCK_M, BLOCK_D],
                )  # fmt: skip
            if STORE_DS != 0:
                # This query head's dSᵀ [T_DS keys, T_DS queries] in the launch's buffer (see `_dq_ds_kernel`).
                ds_base = DS + (pair * GROUP + g).to(tl.int64) * stride_dsh
                ds_ptrs = ds_base + offs_n.to(tl.int64)[:, None] * stride_dsn + offs_m[None, :]
                if STORE_DS == 2:
                    ds_desc = tl.make_tensor_descriptor(
                        ds_base, shape=[stride_dsn, stride_dsn], strides=[stride_dsn, 1],
                        block_shape=[BLOCK_N, BLOCK_M],
                    )  # fmt: skip
            for start_m in range(m_lo, m_hi, BLOCK_M):
                q = q_desc.load([start_m, 0])
                do = do_desc.load([start_m, 0])
                dk, dv, dsT = _dkdv_tile(dk, dv, k, v, q, do, neg_scale_log2e, bias_log2, DOT_MODE, SIG)
                # Only inside the buffer's T_DS ≥ T_MAX columns: packed input may (wrongly) give a max_seqlen
                # under a sequence's length, and the rows past it are dropped anyway.
                if STORE_DS != 0:  # noqa: SIM102 (compile-time test apart from the runtime bound below)
                    if start_m < T_MAX:
                        if STORE_DS == 1:
                            tl.store(ds_ptrs + start_m, dsT)
                        else:
                            ds_desc.store([pid_n * BLOCK_N, start_m], dsT)
                if ATOMIC_DQ != 0:
                    # One-pass backward (opt-in, not deterministic): this key block's share of dQ (unscaled)
                    # is added into a float32 accumulator; the order of the additions varies run to run.
                    dq_part = mma(tl.trans(dsT), k, None, DOT_MODE)
                    if ATOMIC_DQ == 2:
                        # One bulk tensor reduce per tile (the copy engine adds it into global memory).
                        dqa_desc.atomic_add([start_m, 0], dq_part)
                    else:
                        rows = start_m + offs_m
                        tl.atomic_add(
                            dqa_base + rows[:, None] * stride_dqat + offs_d[None, :], dq_part,
                            mask=(rows < n)[:, None] & mask_d[None, :], sem="relaxed",
                        )  # fmt: skip
        else:
            q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
            do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :]
            for start_m in range(m_lo, full_hi, BLOCK_M):
                dk, dv = _dkdv_block(
                    dk, dv, k, v, q_ptrs + start_m * stride_qt, do_ptrs + start_m * stride_dot,
                    start_m, n_rows, offs_m, mask_d, neg_scale_log2e, bias_log2,
                    HEAD_DIM, BLOCK_D, DOT_MODE, False, SIG,
                )  # fmt: skip
            if full_hi < m_hi:
                dk, dv = _dkdv_block(
                    dk, dv, k, v, q_ptrs + n_full * stride_qt, do_ptrs + n_full * stride_dot,
                    n_full, n_rows, offs_m, mask_d, neg_scale_log2e, bias_log2,
                    HEAD_DIM, BLOCK_D, DOT_MODE, True, SIG,
                )  # fmt: skip

    dk = tl.where(key_ok[:, None], dk * scale, 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
    if piece >= 0:  # one part of a split key block's queries: float32 partials for `_split.finish`
        local = tl.arange(0, BLOCK_N)
        p_ptrs = PART + piece.to(tl.int64) * (2 * BLOCK_N * HEAD_DIM) + local[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(p_ptrs, dk, mask=mask_d[None, :])
        tl.store(p_ptrs + BLOCK_N * HEAD_DIM, dv, mask=mask_d[None, :])
    else:
        store_rows = key_ok if VARLEN else offs_n < T_MAX
        out_mask = store_rows[:, None] & mask_d[None, :]
        for i in range(store_heads):
            dk_ptrs = DK + b * stride_dkb + start * stride_dkt + (hk + i) * stride_dkh
            dk_ptrs += offs_n[:, None] * stride_dkt + offs_d[None, :]
            tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=out_mask)
            dv_ptrs = DV + b * stride_dvb + start * stride_dvt + (hk + i) * stride_dvh
            dv_ptrs += offs_n[:, None] * stride_dvt + offs_d[None, :]
            tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _store_dq(
    dq, DQ, b, start, h, offs_m, offs_d, n, scale, stride_dqb, stride_dqt, stride_dqh, T_MAX,
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """Write one query block's dQ (unscaled, float32 [BLOCK_M, BLOCK_D]): scaled, rows past n as 0 (padded layout;
    packed rows of other sequences are left alone), the padded head-dim columns dropped."""
    dq = tl.where((offs_m < n)[:, None], dq * scale, 0.0)
    store_rows = offs_m < n if VARLEN else offs_m < T_MAX
    dq_ptrs = DQ + b * stride_dqb + start * stride_dqt + h * stride_dqh
    dq_ptrs += offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=store_rows[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQ, SEQ, BIAS,
    neg_scale_log2e, scale,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    T_MAX, H,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, DOT_MODE: tl.constexpr, USE_TMA: tl.constexpr, LEN_BUCKET: tl.constexpr = 0,
    SIG: tl.constexpr = 1,
):  # fmt: skip
    pid_m = tl.program_id(0)
    b, h, hk, start, n, bias_log2 = query_head(SEQ, BIAS, tl.program_id(1), H, T_MAX, GROUP, VARLEN)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    row_ok = offs_m < n

    qo_mask = row_ok[:, None] & mask_d[None, :]
    q_ptrs = Q + b * stride_qb + start * stride_qt + h * stride_qh
    q = tl.load(q_ptrs + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qo_mask, other=0.0)
    do_ptrs = DO + b * stride_dob + start * stride_dot + h * stride_doh
    do = tl.load(do_ptrs + offs_m[:, None] * stride_dot + offs_d[None, :], mask=qo_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_keys = tl.where(pid_m * BLOCK_M < n, n, 0)
    if USE_TMA:
        # Keys past n arrive as zeros: v = 0 gives dP = 0 there, so dS = 0 and k's zero rows add nothing.
        k_desc = tl.make_tensor_descriptor(
            K + b * stride_kb + start * stride_kt + hk * stride_kh,
            shape=[tl.maximum(n, 1), HEAD_DIM], strides=[stride_kt, 1], block_shape=[BLOCK_N, BLOCK_D],
        )  # fmt: skip
        v_desc = tl.make_tensor_descriptor(
            V + b * stride_vb + start * stride_vt + hk * stride_vh,
            shape=[tl.maximum(n, 1), HEAD_DIM], strides=[stride_vt, 1], block_shape=[BLOCK_N, BLOCK_D],
        )  # fmt: skip
        for start_n in range(0, n_keys, BLOCK_N):
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
            dq = _dq_tile(dq, q, do, k, v, neg_scale_log2e, bias_log2, DOT_MODE, SIG)
    else:
        k_ptrs = K + b * stride_kb + start * stride_kt + hk * stride_kh
        k_ptrs += offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V + b * stride_vb + start * stride_vt + hk * stride_vh
        v_ptrs += offs_n[:, None] * stride_vt + offs_d[None, :]
        n_full = (n_keys // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            dq = _dq_block(
                dq, q, do, k_ptrs + start_n * stride_kt, v_ptrs + start_n * stride_vt,
                start_n, n_keys, offs_n, mask_d, neg_scale_log2e, bias_log2,
                HEAD_DIM, BLOCK_D, DOT_MODE, False, SIG,
            )  # fmt: skip
        if n_full < n_keys:
            dq = _dq_block(
                dq, q, do, k_ptrs + n_full * stride_kt, v_ptrs + n_full * stride_vt,
                n_full, n_keys, offs_n, mask_d, neg_scale_log2e, bias_log2,
                HEAD_DIM, BLOCK_D, DOT_MODE, True, SIG,
            )  # fmt: skip

    _store_dq(
        dq, DQ, b, start, h, offs_m, offs_d, n, scale, stride_dqb, stride_dqt, stride_dqh, T_MAX, HEAD_DIM, VARLEN
    )


@triton.jit
def _dq_ds_kernel(
    DS, K, DQ, SEQ,
    scale,
    stride_dsh, stride_dsn,
    stride_kb, stride_kt, stride_kh,
    stride_dqb, stride_dqt, stride_dqh,
    T_MAX, H, PAIR0,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, DOT_MODE: tl.constexpr, LEN_BUCKET: tl.constexpr = 0,
):  # fmt: skip
    """dQ = scale · dS K from the dSᵀ the dK/dV kernel stored (STORE_DS): one product per tile pair, no sigmoid.
    One program per (query block, query head of the launch's pairs); reads dSᵀ through a descriptor bounded to
    the sequence's n × n corner (n at most T_MAX, as the stores), so nothing the dK/dV kernel did not write is
    ever read."""
    pid_m = tl.program_id(0)
    local = tl.program_id(1)  # query head within the launch: its buffer slice
    bh = PAIR0 * GROUP + local  # b · H + h
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = h // GROUP
    start, n = seq_bounds(SEQ, b, T_MAX, VARLEN)
    n_desc = tl.maximum(tl.minimum(n, T_MAX), 1)  # what the dK/dV kernel stored (see its STORE_DS branch)
    ds_desc = tl.make_tensor_descriptor(
        DS + local.to(tl.int64) * stride_dsh, shape=[n_desc, n_desc], strides=[stride_dsn, 1],
        block_shape=[BLOCK_N, BLOCK_M],
    )  # fmt: skip
    k_desc = tl.make_tensor_descriptor(
        K + b * stride_kb + start * stride_kt + hk * stride_kh,
        shape=[n_desc, HEAD_DIM], strides=[stride_kt, 1], block_shape=[BLOCK_N, BLOCK_D],
    )  # fmt: skip
    start_m = pid_m * BLOCK_M
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, tl.where(start_m < n, tl.minimum(n, T_MAX), 0), BLOCK_N):
        dsT = ds_desc.load([start_n, start_m])
        k = k_desc.load([start_n, 0])
        dq = mma(tl.trans(dsT), k, dq, DOT_MODE)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    _store_dq(
        dq, DQ, b, start, h, offs_m, offs_d, n, scale, stride_dqb, stride_dqt, stride_dqh, T_MAX, HEAD_DIM, VARLEN
    )


def _dkdv_configs() -> list[triton.Config]:
    # Run 11 (H200, D=128, L=8K, with the ftz/third-order sigmoid): 64x128 w8 s3 414 TFLOPS (whole backward),
    # s2 388; a software-pipelined query loop (tried in run 11, removed) spilled registers at 64x128 (50 and 108
    # spills: 269 / 169) and 128x128 spills too (286).
    return [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    ]


def _dq_configs() -> list[triton.Config]:
    # Run 11: 128x64 w8 s3 435, s2 408, software-pipelined (removed) 380, 128x32 355. Run 12: 128x64 w8 s3
    # 414-422, s4 412-426; the bench's autotuner took 128x64 w8 s3 at D = 64 and 128.
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    ]


def _dq_ds_configs() -> list[triton.Config]:
    # A streamed product (one 16-bit dS read per pair, no sigmoid): deep pipelines, bandwidth-bound at D <= 128.
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    ]


def _prune_bwd(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    if bd is not None and bd >= 256:
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    if kwargs.get("ATOMIC_DQ"):  # the one-pass tile also stages a float32 dQ share: 128x128 does not fit
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 128]
    return configs if AUTOTUNE else configs[:1]


_BWD_KEY = ["HEAD_DIM", "GROUP", "DOT_MODE", "VARLEN", "USE_TMA", "LEN_BUCKET", "SIG"]
_dkdv_tuned = (
    None
    if INTERPRET
    else triton.autotune(
        _dkdv_configs(),
        key=[*_BWD_KEY, "ATOMIC_DQ", "STORE_DS"],
        prune_configs_by={"early_config_prune": _prune_bwd},
        reset_to_zero=["DQA"],  # the one-pass kernel adds into DQA: each timing launch must start from zero
    )(_dkdv_kernel)
)
_dq_tuned = (
    None
    if INTERPRET
    else triton.autotune(_dq_configs(), key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune_bwd})(_dq_kernel)
)
_dq_ds_tuned = (
    None
    if INTERPRET
    else triton.autotune(
        _dq_ds_configs(),
        key=["HEAD_DIM", "GROUP", "DOT_MODE", "VARLEN", "LEN_BUCKET"],
        prune_configs_by={"early_config_prune": _prune_bwd},
    )(_dq_ds_kernel)
)

DQ_PATHS = ("stored", "recompute", "one_pass")
# Where the stored path is the default with the Triton dK/dV kernel: measured faster at 128, slower at 64.
STORED_HEAD_DIMS = range(97, 129)
_DS_BLOCK = 128  # the stored dSᵀ is [T_DS, T_DS] per query head, T_DS the padded length rounded up to this


def ds_rows(t_max: int) -> int:
    """T_DS: rows (and columns) of one query head's stored dSᵀ; a multiple of every key and query block size."""
    return triton.cdiv(max(t_max, 1), _DS_BLOCK) * _DS_BLOCK


def pick_dq_path(
    deterministic: bool,
    use_tma: bool,
    group: int,
    head_dim: int,
    t_max: int,
    element_size: int,
    budget: int,
    ws: bool = False,
) -> tuple[str, int]:
    """(path, pairs per launch) for the backward's dQ: "one_pass" when deterministic=False on tensor-descriptor
    hardware; "stored" for head dims in STORED_HEAD_DIMS (or, with ws, the warp-specialized dK/dV kernel's
    `_bwd_ws.HEAD_DIMS`) when one (batch, key head) pair's dSᵀ (group · T_DS² 16-bit values) fits the scratch
    budget (`_common.ds_scratch_bytes`); else "recompute". Pairs per launch: how many pairs' dSᵀ fit at once.
    Measured on the H200 (docs/benchmarks.md): with the Triton dK/dV kernel the stored path's backward is 4-11%
    faster than recomputing at D = 128 and 0-5% slower at D = 64 (run 13); with the warp-specialized one it is
    10-13% faster at D = 64 (run 15)."""
    if not use_tma:
        return "recompute", 0
    if not deterministic:
        return "one_pass", 0
    if head_dim not in STORED_HEAD_DIMS and not (ws and head_dim in _bwd_ws.HEAD_DIMS):
        return "recompute", 0
    pairs = ds_pairs(group, t_max, element_size, budget)
    return ("stored", pairs) if pairs >= 1 else ("recompute", 0)


def ds_pairs(group: int, t_max: int, element_size: int, budget: int) -> int:
    """How many (batch, key head) pairs' dSᵀ (group · T_DS² values each) fit in `budget` bytes."""
    return budget // (group * ds_rows(t_max) ** 2 * element_size)


def _ds_scratch(pairs: int, group: int, t_max: int, q: torch.Tensor) -> torch.Tensor | None:
    """The stored path's dSᵀ scratch [pairs · group, T_DS, T_DS] (q's dtype) for `pairs` pairs per launch. When the
    allocation runs out of memory it halves the pairs (they then go in more turns), and gives None when not even one
    pair's fits: the backward recomputes dQ instead, with a warning (once per process), rather than failing."""
    global _WARNED_SCRATCH
    t_ds = ds_rows(t_max)
    n = pairs
    while True:
        try:
            return new_output((n * group, t_ds, t_ds), q.dtype, q.device)
        except torch.OutOfMemoryError:
            if n <= 1:
                break
            n //= 2
    if not _WARNED_SCRATCH:
        _WARNED_SCRATCH = True
        warnings.warn(
            f"scfm_kernels: no memory for one (batch, key head) pair's dSᵀ scratch ({group} × {t_ds}² values); the "
            "backward recomputes dQ instead (slower). SCFM_KERNELS_DS_SCRATCH_MIB=0 chooses that path up front.",
            stacklevel=3,
        )
    return None


_WARNED_SCRATCH = False


def _launch(kernel, tuned, config: dict | None, grid, args: tuple, meta: dict) -> None:
    """One launch with a fixed config (benchmarks, the interpreter) or through the autotuner. grid(m) gives the
    grid from the block sizes in m; the benchmark-only keys of a fixed config were applied by the caller."""
    if config is not None:
        known = {*kernel.arg_names, "num_warps", "num_stages"} - {"USE_TMA", "ATOMIC_DQ", "STORE_DS"}
        config = {k: v for k, v in config.items() if k in known}  # SIG may override meta's (sweeps)
        kernel[grid(config)](*args, **{**meta, **config})
    else:
        tuned[grid](*args, **meta)


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq: torch.Tensor,
    bias_B: torch.Tensor,
    scale: float,
    varlen: bool,
    max_seqlen: int,
    dkdv_config: dict | None = None,
    dq_config: dict | None = None,
    deterministic: bool = True,
    dq_path: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the backward kernels; layouts as in `attention_forward`. Returns (dq, dk, dv).

    How dQ is formed (`pick_dq_path` unless dq_path names one of DQ_PATHS; paths other than "recompute" need
    16-bit inputs on tensor-descriptor hardware and fall back to it elsewhere):
      "stored" (deterministic default at head dims 97-128, and at 64 where the warp-specialized dK/dV kernel
          runs): the dK/dV kernel also writes each pair's dSᵀ
          (16-bit, the values the dQ product rounds to anyway) into a scratch buffer of at most
          `_common.ds_scratch_bytes()` (pairs of (batch, key head) in turns when they do not all fit; asked for
          explicitly, at least one pair whatever the budget; fewer pairs per turn, then "recompute", when the
          scratch cannot be allocated: `_ds_scratch`), and `_dq_ds_kernel` streams it once against K:
          5 tile products per score pair plus one streamed product, no second sigmoid; deterministic;
      "recompute": the dQ kernel recomputes S, P and dP (7 products per pair), no scratch;
      "one_pass" (deterministic=False): the dK/dV kernel adds each pair's dQ share into a float32 buffer with
          bulk reduces (5 products; the summation order, and so the last bits of dQ, vary between runs); the
          warp-specialized kernel's at D = 64 on Hopper (dkdv_config KERNEL="ws" with ONE_PASS=2: element atomics
          instead, benchmarks only), the Triton kernel's elsewhere.
    dkdv_config / dq_config (benchmarks): fixed launches instead of the autotuners, as in `attention_forward`;
    dq_config is the launch of whichever dQ kernel runs. Benchmark-only keys: USE_TMA=False (pointer loads,
    "recompute" only), ATOMIC_DQ 1 (element atomics) or 2 (bulk reduce, default) for "one_pass", STORE_DS 1
    (pointer stores, default) or 2 (descriptor stores) for "stored", KERNEL="ws" (with none or one launch of
    `_bwd_ws.dkdv_ws_configs()`) or KERNEL="triton" for the stored path's dK/dV kernel (by default the
    warp-specialized one where it can run; SCFM_KERNELS_BWD=triton: the Triton one), SIG=3 for the dK/dV
    kernel's weights with the forward's one centred Newton step instead of the third-order one (1)."""
    if do.stride(-1) != 1:
        do = do.contiguous()
    if varlen:
        do, q, k, v = do[None], q[None], k[None], v[None]
        B = seq.numel() - 1
    else:
        B = q.shape[0]
    _, T, H, D = q.shape
    HK = k.shape[2]
    G = H // HK
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    t_max = max_seqlen if varlen else T
    use_tma = tma_ok(q, k, v, do)
    if use_tma:
        set_descriptor_allocator()
    budget = ds_scratch_bytes(q.device)
    ws_default = dkdv_config is None and BWD_KERNEL == "ws" and _bwd_ws.supported(q, use_tma)
    path, chunk = pick_dq_path(deterministic, use_tma, G, D, t_max, q.element_size(), budget, ws_default)
    if dq_path is not None:
        if dq_path not in DQ_PATHS:
            raise ValueError(f"dq_path={dq_path!r}: expected one of {DQ_PATHS}")
        if use_tma or dq_path == "recompute":
            path = dq_path
        if path == "stored":  # asked for: whatever the head dim, at least one pair at a time
            chunk = max(1, ds_pairs(G, t_max, q.element_size(), budget))
    pairs = B * HK
    if path == "stored":
        ds = _ds_scratch(min(chunk, pairs), G, t_max, q)
        if ds is None:  # not even one pair's dSᵀ fits in the memory left
            path = "recompute"
        else:
            chunk = ds.shape[0] // G
    kcfg = dict(dkdv_config) if dkdv_config else None
    qcfg = dict(dq_config) if dq_config else None
    fixed = dict(BLOCK_M=16, BLOCK_N=16) if INTERPRET else None
    meta = dict(GROUP=G, HEAD_DIM=D, BLOCK_D=block_d(D), VARLEN=varlen, DOT_MODE=dot_mode(q.dtype))
    meta["LEN_BUCKET"] = len_bucket(t_max)
    # The backward keeps the third-order reciprocal for every dtype: with the forward's centred Newton step
    # (SIG=3) its gradients' error against float64 rose 2.35e-3 -> 2.99e-3 for no speed (H200, run 12).
    kmeta = dict(meta, SIG=1, ATOMIC_DQ=0, STORE_DS=0)
    kmeta["USE_TMA"] = use_tma and (path != "recompute" or (kcfg or {}).get("USE_TMA", True))
    for key in ("ATOMIC_DQ", "STORE_DS"):
        if (kcfg or {}).get(key, 1) not in (1, 2):
            raise ValueError(f"dkdv_config {key}={kcfg[key]!r}: expected 1 or 2 (the path sets whether it is used)")
    if path == "one_pass":
        # Bulk tensor reduce (2) on the GPU; the interpreter has no descriptor reduce: element atomics (1).
        kmeta["ATOMIC_DQ"] = 1 if INTERPRET else (kcfg or {}).get("ATOMIC_DQ", 2)
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq_acc = dq  # not read
    if path == "stored":
        kmeta["STORE_DS"] = (kcfg or {}).get("STORE_DS", 1)
    else:
        chunk, ds = pairs, dq_acc
    s_in = [*_bth(q, varlen), *_bth(k, varlen), *_bth(v, varlen), *_bth(do, varlen)]
    s_out = [*_bth(dk, varlen), *_bth(dv, varlen), *_bth(dq_acc, varlen), ds.stride(0), ds.stride(1)]
    ws = _ws_dkdv(path, q, use_tma, kcfg, ws_default)
    if kcfg is not None:
        kcfg.pop("KERNEL", None)
    key_rows = _bwd_ws.KEY_ROWS if ws else (kcfg or fixed or {}).get("BLOCK_N")
    plan = _dkdv_plan(seq, varlen, t_max, (B, HK, D), chunk, key_rows)
    kmeta["PLANNED"] = int(plan is not None)
    for pair0 in range(0, pairs, max(chunk, 1)):  # no pairs (B = 0): no launch
        c = min(chunk, pairs - pair0)
        tail = (seq, dq_acc) if plan is None else (plan.work, plan.part)  # unused when not planned
        args = (q, k, v, do, dk, dv, dq_acc, ds, seq, bias_B, -scale * LOG2E, scale, *s_in, *s_out, t_max, HK, pair0,
                *tail)  # fmt: skip
        grid = lambda m, c=c: (plan.total,) if plan is not None else (triton.cdiv(t_max, m["BLOCK_N"]), c)  # noqa: E731
        if ws:
            ws_meta = dict(kmeta, ONE_PASS=int(path == "one_pass"))  # 1: bulk reduces of the dQ shares
            _bwd_ws.launch(args, ws_meta, grid(dict(BLOCK_N=key_rows)), kcfg or None)
        else:
            _launch(_dkdv_kernel, _dkdv_tuned, kcfg or fixed, grid, args, kmeta)
        if plan is not None:  # the split key blocks' partial dK and dV, added into place
            rows = plan.rows
            meta_f = dict(TILE_ROWS=rows, HEAD_DIM=D, VARLEN=varlen)
            dims = (t_max, plan.nsm, plan.total)
            _split.finish((dk, *_bth(dk, varlen)), plan.part, plan.work, dims, meta_f, 2 * rows * D)
            _split.finish((dv, *_bth(dv, varlen)), plan.part[rows * D :], plan.work, dims, meta_f, 2 * rows * D)
        if path == "stored":
            args = (ds, k, dq, seq, scale, ds.stride(0), ds.stride(1), *_bth(k, varlen), *_bth(dq, varlen))
            grid = lambda m, c=c: (triton.cdiv(t_max, m["BLOCK_M"]), c * G)  # noqa: E731
            _launch(_dq_ds_kernel, _dq_ds_tuned, qcfg or fixed, grid, (*args, t_max, H, pair0), meta)
    if path == "recompute":
        args = (q, k, v, do, dq, seq, bias_B, -scale * LOG2E, scale, *s_in, *_bth(dq, varlen), t_max, H)
        qmeta = dict(meta, SIG=1, USE_TMA=use_tma and (qcfg or {}).get("USE_TMA", True))
        grid = lambda m: (triton.cdiv(t_max, m["BLOCK_M"]), B * H)  # noqa: E731
        _launch(_dq_kernel, _dq_tuned, qcfg or fixed, grid, args, qmeta)
    if path == "one_pass":
        dq = (dq_acc * scale).to(q.dtype)
    if varlen:
        return dq[0], dk[0], dv[0]
    return dq, dk, dv


def _dkdv_plan(
    seq: torch.Tensor,
    varlen: bool,
    t_max: int,
    dims: tuple[int, int, int],
    chunk: int,
    key_rows: int | None,
) -> _split.Plan | None:
    """The dK/dV launch planned (`_split.plan` over the (batch, key head) pairs: longest sequences first, the last
    round's key blocks in parts over the queries, key blocks past the ends last, one program for every key head
    of each), or None for the 2-D grid:
    SCFM_KERNELS_BWD_PLAN=0, a batch past `_split.PLAN_MAX_B` sequences, pairs in more than one launch (a scratch
    budget too small for all their dSᵀ), or a key block not known before the launch (the autotuned Triton
    kernel). dims: (B, key heads, D)."""
    B, HK, D = dims
    if not BWD_PLAN or key_rows is None or not 1 <= B <= _split.PLAN_MAX_B or chunk < B * HK:
        return None
    # Each piece's partials: the key block's dK, then its dV (`_split.finish` reads the two halves).
    dims = (B, HK, triton.cdiv(t_max, key_rows))
    return _split.prepare(seq, varlen, t_max, dims, key_rows, 2 * key_rows, D, zero_all_heads=True)


def _ws_dkdv(path: str, q: torch.Tensor, use_tma: bool, kcfg: dict | None, ws_default: bool) -> bool:
    """Whether the dK/dV kernel is the warp-specialized one (`_bwd_ws`): asked for with dkdv_config KERNEL="ws"
    (an error where it cannot run); without a dkdv_config, when ws_default (it can run and SCFM_KERNELS_BWD is not
    "triton") on the stored path, and on the one-pass path at `_bwd_ws.ONE_PASS_HEAD_DIMS`; not for a launch of
    the Triton kernel (KERNEL absent or "triton")."""
    one_pass_ok = path == "one_pass" and q.shape[-1] in _bwd_ws.ONE_PASS_HEAD_DIMS
    if kcfg is None:
        return ws_default and (path == "stored" or one_pass_ok)
    can = (path == "stored" or one_pass_ok) and _bwd_ws.supported(q, use_tma)
    asked = kcfg.get("KERNEL", "triton")
    if asked not in ("triton", "ws"):
        raise ValueError(f"dkdv_config KERNEL={asked!r}: expected 'triton' or 'ws'")
    if asked == "ws" and not can:
        raise ValueError(
            f"dkdv_config KERNEL='ws' needs Hopper with 16-bit descriptor-friendly inputs, D in {_bwd_ws.HEAD_DIMS} "
            f"on the stored-dS path or D in {_bwd_ws.ONE_PASS_HEAD_DIMS} on the one-pass path; got path {path!r}, "
            f"{q.dtype}, D={q.shape[-1]} on {q.device}"
        )
    if asked == "ws" and path == "one_pass" and kcfg.get("BLOCK_M", 64) != 64:
        raise ValueError(f"dkdv_config BLOCK_M={kcfg['BLOCK_M']!r}: the one-pass warp-specialized kernel needs 64")
    if "ONE_PASS" in kcfg and (asked != "ws" or path != "one_pass" or kcfg["ONE_PASS"] not in (1, 2, 3, 4)):
        raise ValueError(
            f"dkdv_config ONE_PASS={kcfg['ONE_PASS']!r} (KERNEL={asked!r}, path {path!r}): expected 1, 2, 3 or 4 with "
            "KERNEL='ws' on the one-pass path"
        )
    return asked == "ws"


def _bth(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    return (0 if varlen else t.stride(0)), t.stride(1), t.stride(2)
