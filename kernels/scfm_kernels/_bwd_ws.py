"""Hopper dK/dV kernel of the stored-dS backward, warp-specialized (Gluon): `_bwd._dkdv_kernel` with STORE_DS, in
the arrangement of `_fwd_ws`. The default where it can run (SCFM_KERNELS_BWD=triton: `_bwd._dkdv_kernel`);
measured on the H200 (docs/benchmarks.md, run 15): the backward at D = 128 rose 419-454 → 468-506 TFLOPS dense.

Shape key as in `_bwd`: B batch, T padded length, H query heads, K key/value heads (GROUP = H / K), D head dim.

One program owns NUM_CONSUMERS·64 key rows of one (batch, key head) pair and runs NUM_CONSUMERS + 1 partitions:
  - a loader (the default partition) streams, for each of the GROUP query heads in turn, the sequence's query
    blocks Q_j and dO_j (BLOCK_M rows, descriptors bounded to its n rows: rows past n arrive as zeros and add
    nothing) into NUM_BUF shared-memory stages;
  - consumers (one warp group, 64 key rows each) hold their K and V rows in shared memory and dK, dV in registers.
    Per block: Sᵀ = K Q_jᵀ and dPᵀ = V dO_jᵀ (asynchronous warp-group products; the weights Pᵀ are computed while
    dPᵀ runs), dSᵀ = Pᵀ ⊙ (1 − Pᵀ) ⊙ dPᵀ with 1 − P = e·P (`_tile.sigmoid_parts`), dV += Pᵀ dO_j and dK += dSᵀ Q_j
    from registers, and dSᵀ (16-bit) goes to the scratch buffer through shared memory and a bulk tensor store, for
    `_bwd._dq_ds_kernel` to stream into dQ. Every output element is written once: deterministic.
One pass (ONE_PASS=1, `deterministic=False`, D = 64): instead of storing dSᵀ, each consumer also forms the block's
dQ share dS K (dS read back from shared memory as a transposed operand) and adds it into a float32 dQ buffer with
one bulk tensor reduce; the order of those additions varies from run to run. Measured on the H200 (run 25):
1.02-1.04x the stored path at D = 64, and element atomics instead of the reduce 0.62x.
Planned (PLANNED=1, `_bwd._dkdv_plan`): program i takes its pair, key block and query blocks from row i of the
work table; a part of a split key block writes float32 partial dK and dV instead, for `_split.finish`.
The run-14 ptxas report for `_dkdv_kernel` (255 registers, 136–300 bytes of spills per thread) is what this
partitioning is for: each consumer's accumulators are 64 key rows, its register budget set per partition.
"""

from __future__ import annotations

from . import _fwd_ws
from ._common import compile_sm90 as common_compile_sm90
from ._common import for_head_dim, head_dim_autotuner

# Served where the warp-specialized forward is (Hopper, 16-bit, the same head dims, descriptor-friendly layouts):
# `supported(q, use_tma)`.
from ._fwd_ws import HEAD_DIMS, available, supported  # noqa: F401 (part of this module's interface)

gluon = _fwd_ws.gluon


if gluon is not None:
    from triton._C.libtriton import ir
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared
    from triton.language.core import builtin

    @builtin
    def tma_reduce_add(desc, coord, value, _semantic=None):
        """Adds the register tile `value` into global memory at `coord` of `desc` with one bulk tensor reduce (the
        copy engine's float32 add, staged through shared memory by the compiler, which waits for the copy to have
        read it). Triton 3.6's Gluon has no function for it: this is Triton's `tensor_descriptor.atomic_add` on a
        Gluon descriptor."""
        offsets = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_descriptor_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, value.handle, offsets)

    @builtin
    def smem_view(desc, dtype, shape, layout, _semantic=None):
        """The shared memory of `desc` seen with another shape and layout (Triton 3.6 names the method
        `_reinterpret`, later ones `reinterpret`)."""
        view = getattr(desc, "reinterpret", None) or desc._reinterpret
        return view(dtype, shape, layout, _semantic=_semantic)

    @builtin
    def tma_reduce_add_smem(desc, coord, src, _semantic=None):
        """As `tma_reduce_add` from the shared-memory tile `src`, asynchronous like `tma_store`: `tma.store_wait`
        says when src may be written again (Triton 3.6's Gluon has the operation but no function for it)."""
        offsets = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, offsets, src.handle)

    from ._fwd_ws import (
        gl,
        mbarrier,
        release_stages,
        seq_desc,
        tma,
        tma_load,
        tma_store,
        warpgroup_mma,
        warpgroup_mma_wait,
        zero_rows,
    )
    from ._split import KEY_UNIT, key_work, part_blocks
    from ._tile import key_head, sigmoid_parts

    @gluon.jit
    def _loader(args, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, NUM_BUF: gl.constexpr):
        (Q, DO, stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh, b, hk, start, n, n_blocks, qb0,
         q_smem, do_smem, ready, free) = args  # fmt: skip
        nbytes: gl.constexpr = 2 * BLOCK_M * HEAD_DIM * Q.dtype.element_ty.primitive_bitwidth // 8
        j = 0
        for g in range(GROUP):
            # The descriptors below reuse one global slot per head: the loads issued through the previous head's
            # must have landed before it is rewritten (their stages' last fills completed).
            for k in range(gl.maximum(j - NUM_BUF, 0), j):
                mbarrier.wait(ready.index(k % NUM_BUF), (k // NUM_BUF) & 1)
            h = hk * GROUP + g
            q_base = Q + b * stride_qb + start * stride_qt + h * stride_qh
            do_base = DO + b * stride_dob + start * stride_dot + h * stride_doh
            q_desc = seq_desc(q_base, n, stride_qt, BLOCK_M, HEAD_DIM)
            do_desc = seq_desc(do_base, n, stride_dot, BLOCK_M, HEAD_DIM)
            for i in range(n_blocks):
                stage = j % NUM_BUF
                mbarrier.wait(free.index(stage), ((j // NUM_BUF) & 1) ^ 1)  # fresh barriers pass the first round
                mbarrier.expect(ready.index(stage), nbytes)
                tma_load(q_desc, [(qb0 + i) * BLOCK_M, 0], ready.index(stage), q_smem.index(stage))
                tma_load(do_desc, [(qb0 + i) * BLOCK_M, 0], ready.index(stage), do_smem.index(stage))
                j += 1

    @gluon.jit
    def _reduce_share(dqa_desc, row, dq, dq_smem):
        """dQ share dq [BLOCK_M, D] into DQA at `row` of `dqa_desc` by one bulk reduce from dq_smem, once the
        previous reduce from it has read it (ONE_PASS 3 and 4)."""
        tma.store_wait(0)
        dq_smem.store(dq)
        fence_async_shared()
        tma_reduce_add_smem(dqa_desc, [row, 0], dq_smem)

    @gluon.jit
    def _consumer(
        args, WG: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
        NUM_BUF: gl.constexpr, VARLEN: gl.constexpr, SIG: gl.constexpr, ONE_PASS: gl.constexpr,
    ):  # fmt: skip
        """Consumer WG: key rows [key0 + 64·WG, + 64) of the program's pair; SIG: the weights' reciprocal step
        (`_tile.sigmoid_parts`); ONE_PASS: dQ shares added into DQA instead of dSᵀ stored."""
        (K, V, DK, DV, DS, DQA, neg_scale_log2e, scale, bias_log2, stride_kb, stride_kt, stride_kh, stride_vb,
         stride_vt, stride_vh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh, stride_dqab,
         stride_dqat, stride_dqah, stride_dsh, stride_dsn, b, hk, start, n, n_blocks, qb0, key0, T_MAX, ds_head0,
         piece, PART, k_smem, v_smem, kv_ready, q_smem, do_smem, ds_smem, dq_smem, pair_bars, ready,
         free) = args  # fmt: skip
        BLOCK_N: gl.constexpr = 64
        dtype: gl.constexpr = K.dtype.element_ty
        # ONE_PASS=4: the program's two consumers take turns, block by block, at one dQ share over all 128 keys
        # (both dS tiles, from two shared-memory buffers; pair_bars: 0-1 "both tiles written", 2-3 "read").
        if ONE_PASS == 4:
            paired = key0 + BLOCK_N < n  # both consumers hold keys of the sequence
            pair_k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([2 * BLOCK_N, HEAD_DIM], dtype)
            k_pair = smem_view(k_smem, dtype, [2 * BLOCK_N, HEAD_DIM], pair_k_layout)  # both consumers' K rows
            ds_pairs = ds_smem
        else:
            ds_smem = ds_smem.index(WG)
        key0 = key0 + WG * BLOCK_N
        k_smem = k_smem.index(WG)
        v_smem = v_smem.index(WG)
        kv_ready = kv_ready.index(WG)
        if ONE_PASS >= 3:
            dq_smem = dq_smem.index(WG)
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16]
        )
        d_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
        )
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=d_layout, k_width=2)
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, d_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, d_layout)
        zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, d_layout))
        if ONE_PASS:
            gl.static_assert(BLOCK_M == 64, "ONE_PASS needs 64-row query blocks (one warp group's product rows)")
            zero_dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, d_layout)
            offs_q = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, d_layout))
        if n_blocks > 0 and key0 >= n:
            # Key rows all past the end (the second consumer of a sequence's last key tile): their dK, dV rows are
            # zeros and their dSᵀ rows lie outside the n × n corner `_bwd._dq_ds_kernel` reads, so the consumer
            # only releases each stage as it lands, and the other consumer gets the tensor cores.
            release_stages(ready, free, GROUP * n_blocks, NUM_BUF)
        elif n_blocks > 0:
            k_base = K + b * stride_kb + start * stride_kt + hk * stride_kh
            v_base = V + b * stride_vb + start * stride_vt + hk * stride_vh
            k_desc = seq_desc(k_base, n, stride_kt, BLOCK_N, HEAD_DIM)
            v_desc = seq_desc(v_base, n, stride_vt, BLOCK_N, HEAD_DIM)
            mbarrier.expect(kv_ready, 2 * BLOCK_N * HEAD_DIM * dtype.primitive_bitwidth // 8)
            tma_load(k_desc, [key0, 0], kv_ready, k_smem)
            tma_load(v_desc, [key0, 0], kv_ready, v_smem)
            mbarrier.wait(kv_ready, 0)
            j = 0
            for g in range(GROUP):
                # This query head's descriptor reuses the previous head's global slot: that head's last bulk store
                # or reduce must be done with it.
                tma.store_wait(0)
                if ONE_PASS:
                    # This query head's float32 dQ accumulator, bounded to the sequence's n rows.
                    dqa_base = DQA + b * stride_dqab + start * stride_dqat + (hk * GROUP + g) * stride_dqah
                    dqa_desc = seq_desc(dqa_base, n, stride_dqat, BLOCK_M, HEAD_DIM)
                else:
                    # This query head's dSᵀ [T_DS keys, T_DS queries] in the launch's scratch (see
                    # `_bwd._dq_ds_kernel`).
                    ds_desc = tma.make_tensor_descriptor(
                        DS + (ds_head0 + g).to(gl.int64) * stride_dsh, shape=[stride_dsn, stride_dsn],
                        strides=[stride_dsn, 1], block_shape=[BLOCK_N, BLOCK_M], layout=ds_smem.type.layout,
                    )  # fmt: skip
                for i in range(n_blocks):
                    stage = j % NUM_BUF
                    mbarrier.wait(ready.index(stage), (j // NUM_BUF) & 1)
                    q_j = q_smem.index(stage)
                    do_j = do_smem.index(stage)
                    s_t = warpgroup_mma(k_smem, q_j.permute((1, 0)), zero_s, use_acc=False, is_async=True)
                    dp_t = warpgroup_mma(v_smem, do_j.permute((1, 0)), zero_s, use_acc=False, is_async=True)
                    s_t = warpgroup_mma_wait(1, deps=(s_t,))
                    p_t, e_t = sigmoid_parts(s_t * neg_scale_log2e + bias_log2, False, SIG)
                    p_a = gl.convert_layout(p_t.to(dtype), a_layout)
                    f_t = p_t * (e_t * p_t)  # P ⊙ (1 − P)
                    dv = warpgroup_mma(p_a, do_j, dv, is_async=True)
                    dp_t, dv = warpgroup_mma_wait(1, deps=(dp_t, dv))
                    ds_t = (f_t * dp_t).to(dtype)
                    ds_a = gl.convert_layout(ds_t, a_layout)
                    dk = warpgroup_mma(ds_a, q_j, dk, is_async=True)
                    if ONE_PASS == 4:
                        buf = j % 2
                        use = j // 2
                        pair_ds = ds_pairs.index(buf)  # [128 keys, BLOCK_M]: this block's two dS tiles
                        mine = pair_ds.slice(WG * BLOCK_N, BLOCK_N)
                        if paired and use > 0 and buf != WG:  # the owner has read this buffer's last use
                            mbarrier.wait(pair_bars.index(2 + buf), (use - 1) & 1)
                        mine.store(ds_t)
                        fence_async_shared()
                        if paired:
                            mbarrier.arrive(pair_bars.index(buf))
                        dk, dv, _, _ = warpgroup_mma_wait(0, deps=(dk, dv, p_a, ds_a))
                        mbarrier.arrive(free.index(stage))
                        if paired:
                            if buf == WG:  # this consumer's turn: the share over both tiles
                                mbarrier.wait(pair_bars.index(buf), use & 1)
                                dq = warpgroup_mma(
                                    pair_ds.permute((1, 0)), k_pair, zero_dq, use_acc=False, is_async=True
                                )
                                dq = warpgroup_mma_wait(0, deps=(dq,))
                                mbarrier.arrive(pair_bars.index(2 + buf))
                                _reduce_share(dqa_desc, (qb0 + i) * BLOCK_M, dq, dq_smem)
                        else:  # the other consumer's keys all lie past n: this one's share alone, every block
                            dq = warpgroup_mma(mine.permute((1, 0)), k_smem, zero_dq, use_acc=False, is_async=True)
                            dq = warpgroup_mma_wait(0, deps=(dq,))
                            _reduce_share(dqa_desc, (qb0 + i) * BLOCK_M, dq, dq_smem)
                    elif ONE_PASS:
                        # This block's dQ share, dS K over the consumer's 64 keys: dS from shared memory (the
                        # previous block's product has read it), added into DQA by one bulk tensor reduce.
                        ds_smem.store(ds_t)
                        fence_async_shared()
                        dq = warpgroup_mma(ds_smem.permute((1, 0)), k_smem, zero_dq, use_acc=False, is_async=True)
                        dk, dv, dq, _, _ = warpgroup_mma_wait(0, deps=(dk, dv, dq, p_a, ds_a))
                        mbarrier.arrive(free.index(stage))
                        if ONE_PASS == 2:  # element atomics: 0.62x the bulk reduce (run 25)
                            rows = (qb0 + i) * BLOCK_M + offs_q
                            dq_ptrs = dqa_base + rows[:, None] * stride_dqat + offs_d[None, :]
                            gl.atomic_add(dq_ptrs, dq, mask=(rows < n)[:, None], sem="relaxed")
                        elif ONE_PASS == 3:  # the reduce from a buffer of the kernel's, waited for a block later
                            _reduce_share(dqa_desc, (qb0 + i) * BLOCK_M, dq, dq_smem)
                        else:  # (the compiler stages the tile and waits for the copy to have read it)
                            tma_reduce_add(dqa_desc, [(qb0 + i) * BLOCK_M, 0], dq)
                    else:
                        # dSᵀ to the scratch through shared memory; the previous block's store must have left it.
                        if (qb0 + i) * BLOCK_M < T_MAX:
                            tma.store_wait(0)
                            ds_smem.store(ds_t)
                            fence_async_shared()
                            tma_store(ds_desc, [key0, (qb0 + i) * BLOCK_M], ds_smem)
                        dk, dv, _, _ = warpgroup_mma_wait(0, deps=(dk, dv, p_a, ds_a))
                        mbarrier.arrive(free.index(stage))
                    j += 1
            tma.store_wait(0)

        offs_n = key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, d_layout))
        key_ok = (offs_n < n)[:, None]
        dk = dk * scale
        if piece >= 0:  # one part of a split key block's queries: float32 partials for `_split._finish`
            part_base = PART + piece.to(gl.int64) * (4 * BLOCK_N * HEAD_DIM)  # dK then dV, KEY_ROWS each
            p_ptrs = part_base + (offs_n - key0 + WG * BLOCK_N)[:, None] * HEAD_DIM + offs_d[None, :]
            gl.store(p_ptrs, dk)  # (rows past n: `_split._finish` writes zeros there)
            gl.store(p_ptrs + 2 * BLOCK_N * HEAD_DIM, dv)  # after the KEY_ROWS of dK
        else:
            store_rows = (offs_n < n if VARLEN else offs_n < T_MAX)[:, None]
            dk_ptrs = DK + b * stride_dkb + start * stride_dkt + hk * stride_dkh
            dk_ptrs += offs_n[:, None] * stride_dkt + offs_d[None, :]
            gl.store(dk_ptrs, gl.where(key_ok, dk, 0.0).to(dtype), mask=store_rows)
            dv_ptrs = DV + b * stride_dvb + start * stride_dvt + hk * stride_dvh
            dv_ptrs += offs_n[:, None] * stride_dvt + offs_d[None, :]
            gl.store(dv_ptrs, gl.where(key_ok, dv, 0.0).to(dtype), mask=store_rows)

    @gluon.jit
    def _dkdv_ws_kernel(
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
        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, NUM_BUF: gl.constexpr,
        NUM_CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr, VARLEN: gl.constexpr,
        LEN_BUCKET: gl.constexpr = 0, SIG: gl.constexpr = 1, PLANNED: gl.constexpr = 0, ONE_PASS: gl.constexpr = 0,
    ):  # fmt: skip
        """Arguments as `_bwd._dkdv_kernel`'s, PLANNED as there; ONE_PASS=0: the stored-dS path (DQA unused),
        1: the one-pass path, each block's dQ share added into the float32 DQA by one bulk tensor reduce per
        consumer (DS unused); 2: the same with element atomics; 3: the reduce from the kernel's own buffer, waited
        for only before the next block's share is written; 4: as 3, the two consumers taking turns at one share
        over both dS tiles (half the reduces). 2-4: benchmarks only; 3 and 4 not yet run on the GPU."""
        if PLANNED:
            b, hk, tile, part, n_parts, piece, start, n, bias_log2 = key_work(
                WORK, BIAS, gl.program_id(0), gl.cdiv(T_MAX, NUM_CONSUMERS * 64)
            )
            pair = b * HK + hk
            qb0, qb1 = part_blocks(n, part, n_parts, BLOCK_M, KEY_UNIT)
        else:
            pair = gl.program_id(1)
            b, hk, start, n, bias_log2 = key_head(SEQ, BIAS, pair + PAIR0, HK, T_MAX, VARLEN)
            # piece −1 from a loaded value, as in `_fwd_ws`: Triton 3.6 fails to lower a constant branch around
            # the warp-specialized region.
            tile, piece, qb0 = gl.program_id(0), gl.where(n < 0, -2, -1), 0
            qb1 = gl.cdiv(n, BLOCK_M)
        key0 = tile * (NUM_CONSUMERS * 64)
        # A key block past the sequence's end loads no queries; it only writes zeros (padded layout). Query blocks
        # [qb0, qb1): this program's part of the sequence's.
        n_blocks = gl.where(key0 < n, qb1 - qb0, 0)
        ds_head0 = pair * GROUP  # this pair's first query head in the launch's scratch

        if piece == -3:  # a key tile past a padded sequence's end, every key head: zero dK and dV rows
            zero_rows(DK, b, key0, T_MAX, HK, stride_dkb, stride_dkt, stride_dkh, NUM_CONSUMERS * 64, HEAD_DIM)
            zero_rows(DV, b, key0, T_MAX, HK, stride_dvb, stride_dvt, stride_dvh, NUM_CONSUMERS * 64, HEAD_DIM)
        elif piece != -2:  # (−2: a planned program with nothing to do)
            dtype: gl.constexpr = Q.dtype.element_ty
            kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, HEAD_DIM], dtype)
            q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
            ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BLOCK_M], dtype)
            k_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, 64, HEAD_DIM], kv_layout)
            v_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, 64, HEAD_DIM], kv_layout)
            q_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_M, HEAD_DIM], q_layout)
            do_smem = gl.allocate_shared_memory(dtype, [NUM_BUF, BLOCK_M, HEAD_DIM], q_layout)
            if ONE_PASS == 4:  # two buffers, each with both consumers' dS tiles of one block
                pair_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, BLOCK_M], dtype)
                ds_smem = gl.allocate_shared_memory(dtype, [2, 128, BLOCK_M], pair_layout)
                pair_bars = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
                for i in gl.static_range(2):
                    mbarrier.init(pair_bars.index(i), count=NUM_CONSUMERS)
                    mbarrier.init(pair_bars.index(2 + i), count=1)
            else:
                ds_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, 64, BLOCK_M], ds_layout)
            if ONE_PASS >= 3:  # each consumer's float32 dQ share on its way to the bulk reduce
                dq_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], gl.float32)
                dq_smem = gl.allocate_shared_memory(gl.float32, [NUM_CONSUMERS, BLOCK_M, HEAD_DIM], dq_layout)
            else:
                dq_smem = ds_smem  # (not used)
            kv_ready = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
            if ONE_PASS != 4:
                pair_bars = kv_ready  # (not used)
            ready = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
            free = gl.allocate_shared_memory(gl.int64, [NUM_BUF, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(NUM_CONSUMERS):
                mbarrier.init(kv_ready.index(i), count=1)
            for i in gl.static_range(NUM_BUF):
                mbarrier.init(ready.index(i), count=1)
                mbarrier.init(free.index(i), count=NUM_CONSUMERS)

            ld = (Q, DO, stride_qb, stride_qt, stride_qh, stride_dob, stride_dot, stride_doh, b, hk, start, n,
                  n_blocks, qb0, q_smem, do_smem, ready, free)  # fmt: skip
            c = (K, V, DK, DV, DS, DQA, neg_scale_log2e, scale, bias_log2, stride_kb, stride_kt, stride_kh,
                 stride_vb, stride_vt, stride_vh, stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt,
                 stride_dvh, stride_dqab, stride_dqat, stride_dqah, stride_dsh, stride_dsn, b, hk, start, n, n_blocks,
                 qb0, key0, T_MAX, ds_head0, piece, PART, k_smem, v_smem, kv_ready, q_smem, do_smem, ds_smem,
                 dq_smem, pair_bars, ready, free)  # fmt: skip
            # Constexpr arguments are written out in the call (inside a tuple held in a variable they turn into
            # tensors).
            gl.static_assert(NUM_CONSUMERS == 2, "NUM_CONSUMERS must be 2")
            gl.warp_specialize(
                [
                    (_loader, (ld, GROUP, HEAD_DIM, BLOCK_M, NUM_BUF)),
                    (_consumer, (c, 0, GROUP, HEAD_DIM, BLOCK_M, NUM_BUF, VARLEN, SIG, ONE_PASS)),
                    (_consumer, (c, 1, GROUP, HEAD_DIM, BLOCK_M, NUM_BUF, VARLEN, SIG, ONE_PASS)),
                ],
                [4, 4],
                [CONSUMER_REGS, CONSUMER_REGS],
            )


KEY_ROWS = 128  # key rows per program: NUM_CONSUMERS (2) × 64 in every launch


def _launch(dims: tuple[int, ...], block_m: int, stages: int) -> dict:
    return dict(DIMS=dims, BLOCK_M=block_m, NUM_BUF=stages, NUM_CONSUMERS=2, CONSUMER_REGS=240)


def dkdv_ws_configs(head_dim: int | None = None) -> list[dict]:
    """Launches (for one head dim, or all): BLOCK_M query rows per stage, NUM_BUF stages, two consumers of 64 key
    rows at 240 registers per thread. None spills registers (ptxas, sm_90, Triton 3.6 and 3.9:
    tests/unit/test_kernels_ws.py); at D = 128, 64-row query blocks spilled 8–32 bytes and are left out. At D = 128
    run 15's autotuner chose 32 rows with 4 stages at L = 4K/8K and 6 stages at 16K."""
    configs = [_launch((128,), 32, 4), _launch((128,), 32, 6), _launch((64,), 64, 3), _launch((64,), 32, 4)]
    return for_head_dim(configs, head_dim)


# The one-pass launches (ONE_PASS=1): 64-row query blocks, whose dQ share is one warp group's product, and D = 64
# only (at D = 128 the float32 dQ share's 64 more registers per thread would spill).
ONE_PASS_HEAD_DIMS = (64,)


def one_pass_configs(head_dim: int | None = None) -> list[dict]:
    """Launches of the one-pass kernel (for one head dim, or all), as `dkdv_ws_configs`. None spills with Triton
    3.6 (the GPU machine's); with 3.9 the planned GQA launches spill 8 bytes. Measured on the H200 (run 25, 8K /
    16K / 16K p = .5): 388 / 395 / 386 TFLOPS with 3 stages, 377 / 382 / 365 with 2."""
    return for_head_dim([_launch((64,), 64, 3), _launch((64,), 64, 2)], head_dim)


_KEY = ["HEAD_DIM", "GROUP", "VARLEN", "LEN_BUCKET", "SIG"]
_tuned = head_dim_autotuner(_dkdv_ws_kernel, dkdv_ws_configs, _KEY) if available() else None
# Each timing launch of the one-pass autotuner adds into DQA: it starts from zero every time.
_tuned_1p = head_dim_autotuner(_dkdv_ws_kernel, one_pass_configs, _KEY, reset_to_zero=["DQA"]) if available() else None


def launch(args: tuple, meta: dict, grid: tuple[int, ...], config: dict | None = None) -> None:
    """One launch: args as `_bwd._dkdv_kernel`'s, meta its keywords, grid (key blocks, pairs), or one program per
    row of the work table in args (PLANNED=1)."""
    keep = {k: meta[k] for k in _KEY}
    one_pass = meta.get("ONE_PASS", 0)
    if config is None:
        tuned = _tuned_1p if one_pass else _tuned
        tuned[lambda m: grid](*args, **keep, PLANNED=meta["PLANNED"], ONE_PASS=one_pass)
    else:
        cfg = {**keep, "PLANNED": meta["PLANNED"], "ONE_PASS": one_pass, **config}
        _dkdv_ws_kernel[grid](*args, **cfg, num_warps=4)  # SIG and ONE_PASS (2-4, benchmark variants) may override


def compile_sm90(
    head_dim: int,
    config: dict,
    varlen: bool = False,
    group: int = 1,
    sig: int = 1,
    planned: bool = True,
    one_pass: int = 0,
) -> dict[str, object]:
    """This kernel at one launch (planned or not, stored dSᵀ or one pass: one_pass as the kernel's ONE_PASS),
    compiled for Hopper without a GPU (`_common.compile_sm90`); sig: the weights' reciprocal step (1, the default,
    or 3)."""
    if not available():
        raise RuntimeError("compile_sm90 needs Gluon and a process without TRITON_INTERPRET=1")
    constexprs = dict(
        GROUP=group, HEAD_DIM=head_dim, VARLEN=varlen, SIG=sig, PLANNED=int(planned), ONE_PASS=int(one_pass), **config
    )
    return common_compile_sm90(_dkdv_ws_kernel, constexprs, num_warps=4, gluon_kernel=True)
