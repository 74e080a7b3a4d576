"""Hopper forward, warp-specialized: the forward of `_fwd` with its warp groups decoupled.

Shape key as in `_fwd`: B batch, T padded length (or the longest sequence when packed), H query heads, D head dim.

One program owns NUM_CONSUMERS·BLOCK_M query rows of one (batch, head) and runs NUM_CONSUMERS + 1 partitions
(`gl.warp_specialize`):
  - a loader (the default partition; one thread issues the copies): streams the sequence's key and value blocks
    into NUM_BUF shared-memory stages with tensor-memory-accelerator copies bounded to its n keys (rows past n
    arrive as zeros, so no block needs a mask: v's zero rows cancel whatever weight meets them);
  - NUM_CONSUMERS consumers (one warp group and BLOCK_M = 64 rows each; the autotuner's list uses three) that share
    every stage and release it on an mbarrier when all are done with it.
Each consumer overlaps its own work (`_key_loop`): it issues S_j = Q K_jᵀ and O += P_{j-1} V_{j-1} back to back as
asynchronous warp-group products, then computes the weights P_j = sigmoid(S_j) while O's product runs. No CTA-wide
barrier joins the consumers, so one consumer's weights run under another's products: the schedule `_fwd` cannot
express, whose two warp groups meet at a barrier every key block (docs/benchmarks.md, run 12). Measured on the
H200 (run 14): 577–587 TFLOPS at D = 128, L = 8K/16K, dense and 25% padded, against 531–540 dense for `_fwd`.
Launches with PINGPONG=1 also pass a turn between the consumers (an mbarrier each), so that they issue each
round's products one after another (run 24: +1–2% at D = 64, level at D = 128, where the list leaves it off).

Same arithmetic as `_fwd` (`sigmoid_from_log2`), same output: rows past a sequence's end are written as 0 in the
padded layout and not at all when packed. Needs a Hopper GPU, 16-bit inputs that `tma_ok` accepts and D ∈ {64,
128}; `supported` says whether a call qualifies, and `_fwd.attention_forward` falls back to the Triton kernel
otherwise. Not run by the CPU interpreter (Gluon has none): tests/gpu checks it against float64, and
tests/unit compiles every launch for sm_90 (`compile_sm90`) to check that none spills registers.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

from . import _split
from ._common import INTERPRET, for_head_dim, head_dim_autotuner
from ._common import compile_sm90 as common_compile_sm90

# The planned launch (`_split`: longest sequences first, tiles past the ends last, the last round's tiles in parts
# over the keys) is the default for batches of up to `_split.PLAN_MAX_B` sequences; SCFM_KERNELS_TAIL_SPLIT=0 runs
# one program per tile in a 2-D grid instead. Measured on the H200 (docs/benchmarks.md, run 17): the kernel's own
# span 0.25-4.5% shorter at every bench shape and on the 160M trainer's batch (most at 50% padding); the bench's
# timings, within their ±3-5% spread, favour it on padded batches and not on dense ones.
TAIL_SPLIT = os.environ.get("SCFM_KERNELS_TAIL_SPLIT", "1") != "0"

gluon = None
if not INTERPRET:  # the CPU interpreter runs no Gluon: a process under it does not import it at all
    try:  # Gluon ships with Triton ≥ 3.5; without it the Triton kernel serves every call.
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

        # Triton 3.6 (the GPU machine's) names the descriptor copies async_copy_global_to_shared and
        # async_copy_shared_to_global; later ones async_load and async_store.
        tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
        tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    except ImportError:  # pragma: no cover - depends on the installed Triton
        gluon = None

HEAD_DIMS = (64, 128)


def available() -> bool:
    """Whether this Triton has Gluon and this process may compile for the GPU (not the CPU interpreter)."""
    return gluon is not None


def supported(q: torch.Tensor, use_tma: bool) -> bool:
    """Whether the warp-specialized forward serves q [.., T, H, D]: Hopper (compute capability 9), 16-bit, D in
    HEAD_DIMS, descriptor-friendly layouts (use_tma, `_common.tma_ok`)."""
    return (
        available()
        and use_tma
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] in HEAD_DIMS
        and torch.cuda.get_device_capability(q.device)[0] == 9
    )


if gluon is not None:
    from ._split import KEY_UNIT, part_blocks, work_item
    from ._tile import bias_term, query_head, sigmoid_from_log2

    @gluon.jit
    def _clock():
        """The GPU's global timer, ns (a scalar)."""
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def _cycles():
        """The multiprocessor's cycle counter (a scalar)."""
        return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def seq_desc(base, n, stride_t, BLOCK_ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Descriptor over one sequence's n rows of one head ([n, HEAD_DIM] at `base`, rows `stride_t` apart) in
        blocks of [BLOCK_ROWS, HEAD_DIM]: rows past n arrive as zeros, so no block needs a mask. Its shared layout
        is the default for the block, as the kernels' shared-memory stages are allocated."""
        layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_ROWS, HEAD_DIM], base.dtype.element_ty)
        return tma.make_tensor_descriptor(
            base, shape=[gl.maximum(n, 1), HEAD_DIM], strides=[stride_t, 1], block_shape=[BLOCK_ROWS, HEAD_DIM],
            layout=layout,
        )  # fmt: skip

    @gluon.jit
    def _loader(args, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, NUM_BUF: gl.constexpr):
        (K, V, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, b, hk, start, n, n_blocks, kb0,
         k_smem, v_smem, k_ready, v_ready, kv_free) = args  # fmt: skip
        k_base = K + b * stride_kb + start * stride_kt + hk * stride_kh
        v_base = V + b * stride_vb + start * stride_vt + hk * stride_vh
        k_desc = seq_desc(k_base, n, stride_kt, BLOCK_N, HEAD_DIM)
        v_desc = seq_desc(v_base, n, stride_vt, BLOCK_N, HEAD_DIM)
        nbytes: gl.constexpr = BLOCK_N * HEAD_DIM * K.dtype.element_ty.primitive_bitwidth // 8
        for j in range(n_blocks):
            stage = j % NUM_BUF
            # A fresh barrier counts as having completed the phase before its first: the first NUM_BUF waits pass.
            mbarrier.wait(kv_free.index(stage), ((j // NUM_BUF) & 1) ^ 1)
            mbarrier.expect(k_ready.index(stage), nbytes)
            tma_load(k_desc, [(kb0 + j) * BLOCK_N, 0], k_ready.index(stage), k_smem.index(stage))
            mbarrier.expect(v_ready.index(stage), nbytes)
            tma_load(v_desc, [(kb0 + j) * BLOCK_N, 0], v_ready.index(stage), v_smem.index(stage))

    @gluon.jit
    def _weights(s, neg_scale_log2e, bias_log2, dtype: gl.constexpr, p_layout: gl.constexpr, SIG: gl.constexpr):
        """[BLOCK_M, BLOCK_N] float32 scores → 16-bit weights in the register layout of the P·V product's A."""
        p = sigmoid_from_log2(s * neg_scale_log2e + bias_log2, False, False, SIG)
        return gl.convert_layout(p.to(dtype), p_layout)

    @gluon.jit
    def _take_turn(turn, WG: gl.constexpr, r, PINGPONG: gl.constexpr):
        """PINGPONG: waits until consumer WG may issue its products of round r (the previous consumer's of the round
        are issued; consumer 0 waits for the last one's of round r − 1, its round 0 pre-arrived)."""
        if PINGPONG:
            mbarrier.wait(turn.index(WG), r & 1)

    @gluon.jit
    def _pass_turn(turn, WG: gl.constexpr, NUM_CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr):
        """PINGPONG: hands the next consumer its turn once WG's products of the round are issued."""
        if PINGPONG:
            mbarrier.arrive(turn.index((WG + 1) % NUM_CONSUMERS))

    @gluon.jit
    def _key_loop(
        q_smem, k_smem, v_smem, k_ready, v_ready, kv_free, turn, n_blocks, acc, zero_s, neg_scale_log2e, bias_log2,
        p_layout: gl.constexpr, NUM_BUF: gl.constexpr, SIG: gl.constexpr, WG: gl.constexpr,
        NUM_CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr,
    ):  # fmt: skip
        """One consumer's key loop: per block j, S_j and P_{j-1}·V_{j-1} are issued together, S_j awaited, P_j computed
        under the P·V product, which is awaited before the next block. acc [BLOCK_M, D] float32; returns it.
        (Issuing S_{j+1} before computing P_j, one P·V product in flight across blocks, measured 9–18% slower with
        three consumers: docs/benchmarks.md, run 14.) PINGPONG: the consumers issue each round's products in turn
        (`_take_turn`), so that one's weights run under the others' products."""
        dtype: gl.constexpr = q_smem.dtype
        mbarrier.wait(k_ready.index(0), 0)
        _take_turn(turn, WG, 0, PINGPONG)
        s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        _pass_turn(turn, WG, NUM_CONSUMERS, PINGPONG)
        s = warpgroup_mma_wait(0, deps=(s,))
        p = _weights(s, neg_scale_log2e, bias_log2, dtype, p_layout, SIG)
        for j in range(1, n_blocks):
            stage = j % NUM_BUF
            prev = (j - 1) % NUM_BUF
            mbarrier.wait(k_ready.index(stage), (j // NUM_BUF) & 1)
            mbarrier.wait(v_ready.index(prev), ((j - 1) // NUM_BUF) & 1)
            _take_turn(turn, WG, j, PINGPONG)
            s_next = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            acc = warpgroup_mma(p, v_smem.index(prev), acc, is_async=True)
            _pass_turn(turn, WG, NUM_CONSUMERS, PINGPONG)
            # Products retire in issue order: one outstanding means S_j is done and P_{j-1}·V_{j-1} may run on.
            s = warpgroup_mma_wait(1, deps=(s_next,))
            p_next = _weights(s, neg_scale_log2e, bias_log2, dtype, p_layout, SIG)
            acc, _ = warpgroup_mma_wait(0, deps=(acc, p))
            mbarrier.arrive(kv_free.index(prev))
            p = p_next
        last = (n_blocks - 1) % NUM_BUF
        mbarrier.wait(v_ready.index(last), ((n_blocks - 1) // NUM_BUF) & 1)
        _take_turn(turn, WG, n_blocks, PINGPONG)
        acc = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
        _pass_turn(turn, WG, NUM_CONSUMERS, PINGPONG)
        acc, _ = warpgroup_mma_wait(0, deps=(acc, p))
        mbarrier.arrive(kv_free.index(last))
        return acc

    @gluon.jit
    def release_stages(v_ready, kv_free, n_blocks, NUM_BUF: gl.constexpr):
        """A consumer with no rows to compute: arrives on each stage's release once its fill has landed (waiting for
        the fill keeps each arrival in its own round, so the loader still refills a stage only when all are done)."""
        for j in range(n_blocks):
            stage = j % NUM_BUF
            mbarrier.wait(v_ready.index(stage), (j // NUM_BUF) & 1)
            mbarrier.arrive(kv_free.index(stage))

    @gluon.jit
    def _release_stages_in_turn(
        v_ready, kv_free, turn, n_blocks, WG: gl.constexpr, NUM_BUF: gl.constexpr, NUM_CONSUMERS: gl.constexpr
    ):  # fmt: skip
        """`release_stages` for a ping-pong launch: the consumer also passes on each of its turns (one per key block
        and the last P·V product's, as `_key_loop` takes them), or the others would wait for it."""
        for r in range(n_blocks + 1):
            _take_turn(turn, WG, r, 1)
            _pass_turn(turn, WG, NUM_CONSUMERS, 1)
            if r < n_blocks:
                mbarrier.wait(v_ready.index(r % NUM_BUF), (r // NUM_BUF) & 1)
                mbarrier.arrive(kv_free.index(r % NUM_BUF))

    @gluon.jit
    def _consumer(
        args, WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        NUM_BUF: gl.constexpr, VARLEN: gl.constexpr, SIG: gl.constexpr, TRACING: gl.constexpr,
        NUM_CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr,
    ):  # fmt: skip
        """Consumer WG (0-based) of the program: query rows [row0 + WG·BLOCK_M, + BLOCK_M). TRACING: consumer 0
        writes trace[4] and [6] (its Q has landed: global timer, cycle counter) and trace[5] and [7] (its key loop
        is done)."""
        (Q, O, part_base, stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, neg_scale_log2e, bias_log2, b,
         h, start, n, n_blocks, row0, T_MAX, piece, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready,
         kv_free, turn, trace) = args  # fmt: skip
        tile_row0 = row0
        row0 = row0 + WG * BLOCK_M
        q_smem = q_smem.index(WG)
        q_ready = q_ready.index(WG)
        dtype: gl.constexpr = Q.dtype.element_ty
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

        q_base = Q + b * stride_qb + start * stride_qt + h * stride_qh
        q_desc = seq_desc(q_base, n, stride_qt, BLOCK_M, HEAD_DIM)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        if n_blocks > 0 and row0 >= n:
            # Rows all past the end (the later consumers of a sequence's last tile): no product of theirs would
            # count, so the consumer only releases each stage as it lands (and passes on its turns: one per block
            # and the last P·V product's), and the others get the tensor cores.
            if PINGPONG:
                _release_stages_in_turn(v_ready, kv_free, turn, n_blocks, WG, NUM_BUF, NUM_CONSUMERS)
            else:
                release_stages(v_ready, kv_free, n_blocks, NUM_BUF)
        elif n_blocks > 0:  # (an empty packed sequence at the end has no row to load from)
            mbarrier.expect(q_ready, BLOCK_M * HEAD_DIM * dtype.primitive_bitwidth // 8)
            tma_load(q_desc, [row0, 0], q_ready, q_smem)
            mbarrier.wait(q_ready, 0)
            if TRACING and WG == 0:
                gl.store(trace + 4, _clock())
                gl.store(trace + 6, _cycles())
            acc = _key_loop(
                q_smem, k_smem, v_smem, k_ready, v_ready, kv_free, turn, n_blocks, acc, zero_s, neg_scale_log2e,
                bias_log2, p_layout, NUM_BUF, SIG, WG, NUM_CONSUMERS, PINGPONG,
            )  # fmt: skip
            if TRACING and WG == 0:
                gl.store(trace + 5, _clock())
                gl.store(trace + 7, _cycles())

        offs_m = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        if piece >= 0:  # one part of a split tile's keys: float32 partial rows for `_split._finish`
            p_ptrs = part_base + (offs_m - tile_row0)[:, None] * HEAD_DIM + offs_d[None, :]
            gl.store(p_ptrs, acc)
        else:
            acc = gl.where((offs_m < n)[:, None], acc, 0.0)
            o_ptrs = O + b * stride_ob + start * stride_ot + h * stride_oh
            o_ptrs += offs_m[:, None] * stride_ot + offs_d[None, :]
            store_rows = (offs_m < n if VARLEN else offs_m < T_MAX) & (piece == -1)
            gl.store(o_ptrs, acc.to(dtype), mask=store_rows[:, None])

    @gluon.jit
    def zero_rows(
        O, b, row0, T_MAX, H, stride_ob, stride_ot, stride_oh, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
    ):  # fmt: skip
        """Zeros into rows [row0, row0 + ROWS) ∩ [0, T_MAX) of all H heads of padded sequence b of O ([B, T, H,
        HEAD_DIM]: the output, or dK or dV): a planned program past the sequence's end (piece −3), on the default
        partition's four warps, 64 rows at a time."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [256 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        zeros = gl.zeros([64, HEAD_DIM], O.dtype.element_ty, layout)
        for r in gl.static_range(ROWS // 64):
            rows = row0 + r * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
            ptrs = O + b * stride_ob + rows[:, None] * stride_ot + cols[None, :]
            for h in range(H):
                gl.store(ptrs + h * stride_oh, zeros, mask=(rows < T_MAX)[:, None])

    @gluon.jit
    def _fwd_ws_kernel(
        Q, K, V, O, SEQ, BIAS,
        neg_scale_log2e,
        stride_qb, stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_ob, stride_ot, stride_oh,
        T_MAX, H, WORK, PART, TRACE,
        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
        NUM_BUF: gl.constexpr, VARLEN: gl.constexpr, SIG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
        NUM_CONSUMERS: gl.constexpr = 2, LEN_BUCKET: gl.constexpr = 0, SPLIT: gl.constexpr = 0,
        TRACING: gl.constexpr = 0, PINGPONG: gl.constexpr = 0,
    ):  # fmt: skip
        """SPLIT=1: a planned launch, program i doing row i of the work table WORK (`_split`: longest sequences
        first, the last round's tiles in parts over the keys with partials to PART, a padded sequence's tiles past
        its end one program for all heads); SPLIT=0: a 2-D grid (query tile, pair), WORK and PART unused.
        TRACING=1: program i writes int64 TRACE[8i … 8i + 7] (`trace`)."""
        if TRACING:
            t_start = _clock()
        if SPLIT:
            b, h, m, part, n_parts, piece, n, start = work_item(WORK, gl.program_id(0))
            b = b.to(gl.int64)
            hk = h // GROUP
            bias_log2 = bias_term(BIAS, b)
            kb0, kb1 = part_blocks(n, part, n_parts, BLOCK_N, KEY_UNIT)
        else:
            b, h, hk, start, n, bias_log2 = query_head(SEQ, BIAS, gl.program_id(1), H, T_MAX, GROUP, VARLEN)
            # piece −1 for every tile, from a loaded value: a branch below on a constant condition (scf.if on a
            # folded constant around the warp-specialized region) fails to lower in Triton 3.6.
            m, piece = gl.program_id(0), gl.where(n < 0, -2, -1)
            kb0, kb1 = 0, gl.cdiv(n, BLOCK_N)
        row0 = m * (NUM_CONSUMERS * BLOCK_M)
        # A program whose rows all lie past the sequence's end loads no keys; it only writes zeros (padded layout).
        n_blocks = gl.where((row0 < n) & (piece != -2), kb1 - kb0, 0)
        trace = TRACE + (gl.program_id(0) + gl.program_id(1) * gl.num_programs(0)).to(gl.int64) * 8
        if TRACING:
            t_plan = _clock()
        part_base = PART + gl.maximum(piece, 0).to(gl.int64) * (NUM_CONSUMERS * BLOCK_M * HEAD_DIM)

        if piece == -3:  # tiles of rows past a padded sequence's end, every head: zeros, no keys, no barriers
            zero_rows(O, b, row0, T_MAX, H, stride_ob, stride_ot, stride_oh, NUM_CONSUMERS * BLOCK_M, HEAD_DIM)
        elif piece != -2:  # (−2: a planned program with nothing to do)
            dtype: gl.constexpr = Q.dtype.element_ty
            q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
            kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
            q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, BLOCK_M, HEAD_DIM], q_layout)
            k_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, HEAD_DIM], kv_layout)
            v_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_N, HEAD_DIM], kv_layout)
            q_ready = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
            k_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
            v_ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
            kv_free = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(NUM_CONSUMERS):
                mbarrier.init(q_ready.index(i), count=1)
            for i in gl.static_range(NUM_BUF):
                mbarrier.init(k_ready.index(i), count=1)
                mbarrier.init(v_ready.index(i), count=1)
                mbarrier.init(kv_free.index(i), count=NUM_CONSUMERS)  # every consumer releases each stage
            turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
            if PINGPONG:
                for i in gl.static_range(NUM_CONSUMERS):
                    mbarrier.init(turn.index(i), count=1)
                mbarrier.arrive(turn.index(0))  # consumer 0's first turn

            kv = (K, V, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, b, hk, start, n, n_blocks,
                  kb0, k_smem, v_smem, k_ready, v_ready, kv_free)  # fmt: skip
            c = (Q, O, part_base, stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh, neg_scale_log2e,
                 bias_log2, b, h, start, n, n_blocks, row0, T_MAX, piece, q_smem, k_smem, v_smem, q_ready, k_ready,
                 v_ready, kv_free, turn, trace)  # fmt: skip
            # Constexpr arguments are written out in the call (inside a tuple held in a variable they turn into
            # tensors).
            if NUM_CONSUMERS == 2:
                gl.warp_specialize(
                    [
                        (_loader, (kv, HEAD_DIM, BLOCK_N, NUM_BUF)),
                        (
                            _consumer,
                            (c, 0, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_BUF, VARLEN, SIG, TRACING, NUM_CONSUMERS, PINGPONG),
                        ),
                        (
                            _consumer,
                            (c, 1, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_BUF, VARLEN, SIG, TRACING, NUM_CONSUMERS, PINGPONG),
                        ),
                    ],
                    [4, 4],
                    [CONSUMER_REGS, CONSUMER_REGS],
                )
            else:
                gl.static_assert(NUM_CONSUMERS == 3, "NUM_CONSUMERS must be 2 or 3")
                gl.warp_specialize(
                    [
                        (_loader, (kv, HEAD_DIM, BLOCK_N, NUM_BUF)),
                        (
                            _consumer,
                            (c, 0, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_BUF, VARLEN, SIG, TRACING, NUM_CONSUMERS, PINGPONG),
                        ),
                        (
                            _consumer,
                            (c, 1, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_BUF, VARLEN, SIG, TRACING, NUM_CONSUMERS, PINGPONG),
                        ),
                        (
                            _consumer,
                            (c, 2, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_BUF, VARLEN, SIG, TRACING, NUM_CONSUMERS, PINGPONG),
                        ),
                    ],
                    [4, 4, 4],
                    [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS],
                )
        if TRACING:
            t_end = _clock()
            gl.store(trace, t_start)
            gl.store(trace + 1, t_plan)
            gl.store(trace + 2, t_end)
            sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=True, pack=1)
            gl.store(trace + 3, sm.to(gl.int64))


def _launch(dims: tuple[int, ...], consumers: int, block_n: int, stages: int, regs: int, pingpong: int = 0) -> dict:
    return dict(
        DIMS=dims, NUM_CONSUMERS=consumers, BLOCK_M=64, BLOCK_N=block_n, NUM_BUF=stages, CONSUMER_REGS=regs,
        PINGPONG=pingpong,
    )  # fmt: skip


def fwd_ws_configs(head_dim: int | None = None) -> list[dict]:
    """The launches the autotuner chooses from (for one head dim, or all): NUM_CONSUMERS warp groups of BLOCK_M
    query rows, BLOCK_N keys per stage, NUM_BUF stages, CONSUMER_REGS registers per consumer thread (the loader
    keeps the rest), PINGPONG 1: the consumers issue their products in turn (`_key_loop`). None spills registers
    (ptxas, sm_90: tests/unit/test_kernels_ws.py). Sweep of 2026-12-01 (tests/gpu/probe_fwd_ws.py;
    docs/benchmarks.md, run 14), D = 128, TFLOPS at 8K dense / 8K p = .25 / 16K dense: two consumers, 64 keys, 3
    stages 557 / 541 / 569, 4 stages 551 / 523 / 557, 128 keys 529 / 511 / 548; three consumers, 64 keys, 3 / 4 /
    5 stages 582 / 567 / 598, 598 / 499 / 603, 584 / 560 / 595. D = 64, 8K dense: three consumers, 128 keys, 3
    stages 455 (two consumers 404), 64 keys, 4 stages 437. Ping-pong (run 24, planned, 8K / 16K / 16K p = .5): at
    D = 64, 128 keys 442 / 458 / 446 → 450 / 462 / 444 and 64 keys 440 / 453 / 442 → 450 / 458 / 449; at D = 128
    level or slower (8K 610 → 618, 16K 634 → 628, the trainer's batch 635 → 607), so D = 128 keeps it off."""
    configs = [
        _launch((128,), 3, 64, 4, 160),
        _launch((128,), 3, 64, 3, 160),
        _launch((64,), 3, 128, 3, 160, 1),
        _launch((64,), 3, 64, 4, 160, 1),
        _launch((64,), 3, 128, 3, 160),
    ]
    return for_head_dim(configs, head_dim)


_KEY = ["HEAD_DIM", "GROUP", "VARLEN", "SIG", "LEN_BUCKET"]
_tuned = head_dim_autotuner(_fwd_ws_kernel, fwd_ws_configs, _KEY) if available() else None


def tile_rows(head_dim: int, config: dict | None = None) -> int:
    """Query rows per program: of `config`, or the one value every launch of the list for head_dim shares (the
    planned launch counts tiles before the autotuner picks a launch)."""
    if config is not None:
        return config.get("NUM_CONSUMERS", 2) * config["BLOCK_M"]
    return _list_tile_rows(head_dim)


@functools.cache
def _list_tile_rows(head_dim: int) -> int:
    """`tile_rows` of the launch list, worked out once per head dim (every forward call asks)."""
    rows = {c["NUM_CONSUMERS"] * c["BLOCK_M"] for c in fwd_ws_configs(head_dim)}
    if len(rows) != 1:
        raise AssertionError(
            f"fwd_ws_configs({head_dim}) mixes tile heights {sorted(rows)}; the planned launch needs one"
        )
    return rows.pop()


_trace_buffer: torch.Tensor | None = None


@contextlib.contextmanager
def trace(buffer: torch.Tensor):
    """Within the block every warp-specialized forward launch records, per program i (grid order, x fastest),
    int64 buffer[8i … 8i + 7] = (start, end of its plan, end, multiprocessor, consumer 0's Q landed, consumer 0's
    key loop done, the same two in the multiprocessor's cycles; the last four 0 where it loads no keys), times
    in global-timer ns: the schedule the hardware ran (tests/gpu/trace_fwd_ws.py). buffer: int64 on the GPU,
    zeroed, ≥ 8 per program."""
    global _trace_buffer
    if buffer.dtype != torch.int64 or not buffer.is_cuda:
        raise ValueError(f"trace needs an int64 CUDA buffer, got {buffer.dtype} on {buffer.device}")
    _trace_buffer = buffer
    try:
        yield buffer
    finally:
        _trace_buffer = None


def launch(args: tuple, meta: dict, t_max: int, B: int, H: int, config: dict | None = None) -> None:
    """Launches the warp-specialized forward: args as `_fwd._fwd_kernel`'s, meta its keyword arguments (the ones
    named in the autotune key are used); config, a fixed launch from `fwd_ws_configs()` instead of the autotuner,
    with SPLIT=0/1 to override SCFM_KERNELS_TAIL_SPLIT. Planned (the default, batches of up to
    `_split.PLAN_MAX_B` sequences): `_split.plan` writes the work table (longest sequences first, the last round's
    tiles in parts over the keys), and `_split.finish` adds the parts' partials."""
    keep = {k: meta[k] for k in _KEY}
    cfg = dict(config) if config is not None else None
    planned = cfg.pop("SPLIT", TAIL_SPLIT) if cfg is not None else TAIL_SPLIT
    split = int(bool(planned) and 1 <= B <= _split.PLAN_MAX_B)
    rows = tile_rows(meta["HEAD_DIM"], cfg)
    n_m = triton.cdiv(t_max, rows)
    o, seq, bias = args[3], args[4], args[5]
    if split:
        plan = _split.prepare(seq, meta["VARLEN"], t_max, (B, H, n_m), rows, rows, meta["HEAD_DIM"], True)
        tail = (plan.work, plan.part)
        grid = (plan.total,)
    else:
        tail = (seq, bias)  # unused, of the pointer types the kernel declares
        grid = (n_m, B * H)
    tracing = _trace_buffer is not None
    if tracing:
        programs = grid[0] * (grid[1] if len(grid) > 1 else 1)
        if _trace_buffer.numel() < 8 * programs:
            raise ValueError(f"trace buffer holds {_trace_buffer.numel()} int64, the launch needs 8 × {programs}")
        tail = (*tail, _trace_buffer)
    else:
        tail = (*tail, seq)  # unused
    if cfg is None:
        _tuned[lambda m: grid](*args, *tail, **keep, SPLIT=split, TRACING=int(tracing))
    else:
        _fwd_ws_kernel[grid](*args, *tail, **keep, **cfg, SPLIT=split, TRACING=int(tracing), num_warps=4)
    if split:
        finish = dict(TILE_ROWS=rows, HEAD_DIM=meta["HEAD_DIM"], VARLEN=meta["VARLEN"])
        _split.finish((o, *args[16:19]), plan.part, plan.work, (t_max, plan.nsm, plan.total), finish)


def compile_sm90(
    head_dim: int, config: dict, varlen: bool = False, dtype: str = "bf16", split: bool = True
) -> dict[str, object]:
    """The warp-specialized forward at one launch (planned or not), compiled for Hopper without a GPU
    (`_common.compile_sm90`)."""
    if not available():
        raise RuntimeError("compile_sm90 needs Gluon and a process without TRITON_INTERPRET=1")
    sig = 3 if dtype == "bf16" else 1
    constexprs = dict(GROUP=1, HEAD_DIM=head_dim, VARLEN=varlen, SIG=sig, SPLIT=int(split), **config)
    return common_compile_sm90(_fwd_ws_kernel, constexprs, dtype, num_warps=4, gluon_kernel=True)
