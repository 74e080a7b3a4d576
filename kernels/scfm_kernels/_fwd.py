"""Forward kernel: O = sigmoid(Q Kᵀ · scale + b) V, one program per (query block, batch · head).

Shape key: B batch, T padded length (or the longest sequence when packed), H query heads, K key/value heads,
D head dim, BD head dim padded to a power of two.

Both layouts go through one kernel. Padded: q [B, T, H, D], sequence b owns rows [0, seq_lens[b]) of its
slice and the rows past it are written as 0. Packed (VARLEN): q [N, H, D] with a zero batch stride and
sequence b owns rows [cu_seqlens[b], cu_seqlens[b + 1]); rows of other sequences are never written.
Key blocks past a sequence's end are never loaded: the key loop stops at the last block that holds a valid
key, and only that block is masked.

The sigmoid is p = 1 / (1 + 2^(−(s·scale + b)·log2 e)): one flush-to-zero ex2 on the special-function unit and
a reciprocal on the FMA pipe (bit-trick seed, then one centred Newton step for bfloat16 or one third-order step
for float16, `sigmoid_parts`), so each score costs one special-function op, as in softmax. Measured on the H200
(docs/benchmarks.md, runs 3, 11 and 12): relative error per weight ≤ 1.28e-3 (bf16; a third of a bf16 ulp) and
≤ 1.3e-4 (fp16); attention output error against float64 2.5e-3 (bf16, was 2.3e-3 with the third-order step);
forward 529 TFLOPS at D=128, L=8K (fixed launch, third-order step) against 501 with the non-ftz ex2 and two
Newton steps and 425 (run 3) with the hardware reciprocal (two special-function ops); the centred Newton step
adds 0.6–3.5% (run 12). The tanh form 0.5·tanh(x/2) + 0.5 (FAST_SIGMOID, measured
only) is not used: at the logits a −log(n) bias produces (x ≈ −9 for n = 8K, sigmoid(x) ≈ 1e-4) it subtracts two
numbers near 1, and its relative error per weight reached 0.25 (σ = 1) and 1.0 (σ = 3) at n = 16K, median 3e-3.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    AUTOTUNE,
    INTERPRET,
    block_d,
    dot_mode,
    len_bucket,
    new_output,
    set_descriptor_allocator,
    sigmoid_mode,
    tma_ok,
)

LOG2E = 1.4426950408889634


# Under the CPU interpreter inline PTX cannot run: tl.exp2 stands in for the flush-to-zero ex2 instruction.
_PTX = tl.constexpr(not INTERPRET)


@triton.jit
def exp2_ftz(z):
    """2^z with the special-function unit's ex2 in flush-to-zero mode: one MUFU op (the SASS of the run-11 forward
    shows MUFU.EX2 and no range test). Plain tl.exp2 on float32 lowers to the non-ftz ex2, for which ptxas adds
    subnormal-result handling around the MUFU op; a sigmoid weight under 2^-126 is 0 either way."""
    if _PTX:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=True, pack=1)
    else:
        e = tl.exp2(z)
    return e


@triton.jit
def recip_seed(d):
    """1/d to a relative error of 0.051 for d ≥ 1, from d's bits (magic − bits(d)): no special-function op."""
    return (0x7EF311C3 - d.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def sigmoid_parts(z, EXACT_DIV: tl.constexpr = False, SIG: tl.constexpr = 1):
    """(p, e) with p = sigmoid(x) = 1 / (1 + e), e = 2^z, given z = −x·log2 e (clamped at 120, so a huge z gives
    p ≈ 1e-36, not NaN). 1 − p = e·p keeps its relative accuracy as p → 1, where 1 − p itself would cancel: the
    backward's P(1 − P) is p·(e·p).

    Default (SIG=1): one flush-to-zero ex2 (`exp2_ftz`) and a reciprocal on the FMA pipe: bit-trick seed
    y₀ = `recip_seed`(d), d = 1 + e (relative error t ≤ 0.051), then one third-order step y = y₀(1 + t + t²) in
    three FMAs (relative error t³ ≤ 1.3e-4: under half an fp16 ulp, a thirtieth of a bf16 ulp; every weight is
    rounded to 16 bits for the next product anyway). Per score: one special-function op and six FMA-pipe issues.
    Measured on the H200 (docs/benchmarks.md, run 11): forward +5.6% over the run-10 kernels' non-ftz ex2 (with
    ptxas's subnormal handling) and two Newton steps (relative error ≤ 7.2e-6; removed). Moving the clamp onto
    d's integer bits (one FMA-pipe issue fewer) measured 5% slower and was removed.
    SIG=3 (the forward's choice for bfloat16, `_common.sigmoid_mode`; the backward keeps SIG=1): the same seed
    taken of d/c and one Newton step, y(2 − (d/c)y): four FMA-pipe issues instead of six. A Newton step always
    lands below 1/d (relative error −t² ∈ [−2.6e-3, 0]); the constant c = 1.001277 centres that at ±1.28e-3
    (checked over d ∈ [1, 2^120] in float32 on the CPU), a third of a bfloat16 ulp: the weight is rounded to
    bfloat16 for the P·V product anyway (half-ulp up to 3.9e-3).
    EXACT_DIV (float32 inputs): IEEE-rounded division.
    """
    z = tl.minimum(z, 120.0)
    if EXACT_DIV:
        e = tl.exp2(z)
        p = tl.math.div_rn(1.0, 1.0 + e)
    elif SIG == 3:
        e = exp2_ftz(z)
        d = e * 0.99872463 + 0.99872463  # (1 + e) / c
        y = recip_seed(d)
        p = y * (2.0 - d * y)
    else:
        e = exp2_ftz(z)
        d = 1.0 + e
        y = recip_seed(d)
        t = 1.0 - d * y
        p = y + y * (t + t * t)
    return p, e


@triton.jit
def sigmoid_from_log2(z, FAST_SIGMOID: tl.constexpr, EXACT_DIV: tl.constexpr = False, SIG: tl.constexpr = 1):
    """sigmoid(x) given z = −x·log2 e: `sigmoid_parts`' p. FAST_SIGMOID (measured only): 0.5·tanh(x/2) + 0.5 on
    the hardware tanh approximation, not used: at the logits a −log(n) bias gives (x ≈ −9 at n = 8K) it subtracts
    two numbers near 1 (relative error per weight up to 0.25–1.0)."""
    if FAST_SIGMOID:
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [z * -0.34657359027997264], dtype=tl.float32, is_pure=True, pack=1
        )
        p = 0.5 * t + 0.5
    else:
        p, _ = sigmoid_parts(z, EXACT_DIV, SIG)
    return p


@triton.jit
def mma(a, b, acc, DOT_MODE: tl.constexpr):
    """a @ b (+ acc) with float32 accumulation; DOT_MODE as in `_common.dot_mode`."""
    if DOT_MODE == 1:
        out = tl.dot(a, b, acc, input_precision="ieee")
    elif DOT_MODE == 2:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def seq_bounds(SEQ, b, T_MAX, VARLEN: tl.constexpr):
    """(first row, length) of sequence b: from cu_seqlens when packed, from seq_lens when padded."""
    if VARLEN:
        first = tl.load(SEQ + b)
        n = tl.load(SEQ + b + 1) - first
        start = first.to(tl.int64)
    else:
        start = 0
        n = tl.minimum(tl.load(SEQ + b), T_MAX)
    return start, n


@triton.jit
def _fwd_kernel(
    Q, K, V, O, SEQ, BIAS,
    neg_scale_log2e,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T_MAX, H,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, DOT_MODE: tl.constexpr, FAST_SIGMOID: tl.constexpr,
    USE_TMA: tl.constexpr, WS: tl.constexpr, LEN_BUCKET: tl.constexpr = 0,
    SIG: tl.constexpr = 1,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = h // GROUP
    start, n = seq_bounds(SEQ, b, T_MAX, VARLEN)
    bias_log2 = -tl.load(BIAS + b) * 1.4426950408889634

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    row_ok = offs_m < n

    q_ptrs = Q + b * stride_qb + start * stride_qt + h * stride_qh
    q_ptrs += offs_m[:, None] * stride_qt + offs_d[None, :]

    q = tl.load(q_ptrs, mask=row_ok[:, None] & mask_d[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # A query block past the sequence's end loads no keys; it only writes zeros (padded layout).
    n_keys = tl.where(pid_m * BLOCK_M < n, n, 0)
    if USE_TMA:
        # Tensor-memory-accelerator loads through descriptors bounded to this sequence's n keys: rows past n
        # (and head-dim columns past D) arrive as zeros, so v's zero rows cancel whatever p is there and
        # no block needs a mask.
        k_desc = tl.make_tensor_descriptor(
            K + b * stride_kb + start * stride_kt + hk * stride_kh,
            shape=[tl.maximum(n, 1), HEAD_DIM], strides=[stride_kt, 1], block_shape=[BLOCK_N, BLOCK_D],
        )  # fmt: skip
        v_desc = tl.make_tensor_descriptor(
            V + b * stride_vb + start * stride_vt + hk * stride_vh,
            shape=[tl.maximum(n, 1), HEAD_DIM], strides=[stride_vt, 1], block_shape=[BLOCK_N, BLOCK_D],
        )  # fmt: skip
        for start_n in tl.range(0, n_keys, BLOCK_N, warp_specialize=WS):
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
            s = mma(q, tl.trans(k), None, DOT_MODE)
            p = sigmoid_from_log2(s * neg_scale_log2e + bias_log2, FAST_SIGMOID, DOT_MODE == 1, SIG)
            acc = mma(p.to(v.dtype), v, acc, DOT_MODE)
    else:
        k_ptrs = K + b * stride_kb + start * stride_kt + hk * stride_kh
        k_ptrs += offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V + b * stride_vb + start * stride_vt + hk * stride_vh
        v_ptrs += offs_n[:, None] * stride_vt + offs_d[None, :]
        n_full = (n_keys // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            if HEAD_DIM == BLOCK_D:
                k = tl.load(k_ptrs + start_n * stride_kt)
                v = tl.load(v_ptrs + start_n * stride_vt)
            else:
                k = tl.load(k_ptrs + start_n * stride_kt, mask=mask_d[None, :], other=0.0)
                v = tl.load(v_ptrs + start_n * stride_vt, mask=mask_d[None, :], other=0.0)
            s = mma(q, tl.trans(k), None, DOT_MODE)
            p = sigmoid_from_log2(s * neg_scale_log2e + bias_log2, FAST_SIGMOID, DOT_MODE == 1, SIG)
            acc = mma(p.to(v.dtype), v, acc, DOT_MODE)
        if n_full < n_keys:
            col_ok = (n_full + offs_n) < n_keys
            k = tl.load(k_ptrs + n_full * stride_kt, mask=col_ok[:, None] & mask_d[None, :], other=0.0)
            v = tl.load(v_ptrs + n_full * stride_vt, mask=col_ok[:, None] & mask_d[None, :], other=0.0)
            s = mma(q, tl.trans(k), None, DOT_MODE)
            p = sigmoid_from_log2(s * neg_scale_log2e + bias_log2, FAST_SIGMOID, DOT_MODE == 1, SIG)
            p = tl.where(col_ok[None, :], p, 0.0)
            acc = mma(p.to(v.dtype), v, acc, DOT_MODE)

    acc = tl.where(row_ok[:, None], acc, 0.0)
    o_ptrs = O + b * stride_ob + start * stride_ot + h * stride_oh
    o_ptrs += offs_m[:, None] * stride_ot + offs_d[None, :]
    store_rows = row_ok if VARLEN else offs_m < T_MAX
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=store_rows[:, None] & mask_d[None, :])


def _fwd_configs() -> list[triton.Config]:
    # Sweep of 2026-11-29 (tests/gpu/sweep_kernels.py, H200, D=128, L=8K dense / 4K p=0.5, TFLOPS):
    # descriptors 128x128 w8 s3 502 / 417, + warp specialization 500 / 440, pointer loads 128x128 w8 s3 472 / 408.
    # Run 11 (2026-12-01), ftz/third-order sigmoid: 128x128 w8 s3 529 / 463, + warp specialization 526 / 458,
    # software-pipelined key loop 128x128 s2 474 / 382, 128x64 w8 s3 520 / 458 (in no list since, removed in
    # run 12). Run 12, bf16 with the centred Newton step:
    # 128x128 w8 s3 512 / 446, 256x64 w8 s3 539 / 468, 128x64 w4 s2 (one warp group, two programs per
    # multiprocessor) 530 / 470, 128x64 w4 s3 476 / 402, 256x64 w8 s2 432 / 370. The warp-specialized 128x128
    # left the list: under ncu it runs 256 threads and the same stalls as the plain loop (Triton 3.6 adds no
    # producer warps on Hopper here).
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "WS": False}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "WS": False}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "WS": False}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "WS": False}, num_warps=4, num_stages=2),
    ]


def _prune_fwd(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    if bd is not None and bd >= 256:
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return configs if AUTOTUNE else configs[:1]


_fwd_tuned = (
    None
    if INTERPRET
    else triton.autotune(
        configs=_fwd_configs(),
        key=["HEAD_DIM", "GROUP", "DOT_MODE", "VARLEN", "FAST_SIGMOID", "USE_TMA", "LEN_BUCKET", "SIG"],
        prune_configs_by={"early_config_prune": _prune_fwd},
    )(_fwd_kernel)
)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq: torch.Tensor,
    bias_B: torch.Tensor,
    scale: float,
    varlen: bool,
    max_seqlen: int,
    fast_sigmoid: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """Launches the forward kernel. Padded: q [B, T, H, D], seq = seq_lens [B]. Packed: q [N, H, D],
    seq = cu_seqlens [B + 1]. bias_B float32 [B]. Returns o with q's shape.

    config (benchmarks): a fixed launch instead of the autotuner, e.g. dict(BLOCK_M=128, BLOCK_N=128,
    num_warps=8, num_stages=3, USE_TMA=True, WS=False); USE_TMA falls back to pointers where not allowed."""
    if varlen:
        q, k, v = q[None], k[None], v[None]
        B = seq.numel() - 1
    else:
        B = q.shape[0]
    _, T, H, D = q.shape
    o = new_output(q.shape, q.dtype, q.device)
    t_max = max_seqlen if varlen else T
    strides = [*_bth(q, varlen), *_bth(k, varlen), *_bth(v, varlen), *_bth(o, varlen)]
    args = (q, k, v, o, seq, bias_B, -scale * LOG2E, *strides, t_max, H)
    meta = dict(
        GROUP=H // k.shape[2],
        HEAD_DIM=D,
        BLOCK_D=block_d(D),
        VARLEN=varlen,
        DOT_MODE=dot_mode(q.dtype),
        FAST_SIGMOID=fast_sigmoid,
        USE_TMA=tma_ok(q, k, v),
        LEN_BUCKET=len_bucket(t_max),
        SIG=sigmoid_mode(q.dtype),
    )
    if meta["USE_TMA"]:
        set_descriptor_allocator()
    if config is not None:
        config = dict(config)
        meta["USE_TMA"] = config.pop("USE_TMA", True) and meta["USE_TMA"]
        meta["WS"] = config.pop("WS", False)
        _fwd_kernel[(triton.cdiv(t_max, config["BLOCK_M"]), B * H)](*args, **{**meta, **config})
    elif INTERPRET:
        _fwd_kernel[(triton.cdiv(t_max, 16), B * H)](*args, **meta, WS=False, BLOCK_M=16, BLOCK_N=16)
    else:
        _fwd_tuned[lambda m: (triton.cdiv(t_max, m["BLOCK_M"]), B * H)](*args, **meta)
    return o[0] if varlen else o


def _bth(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, T, H, D] view; packed tensors have no batch stride."""
    return (0 if varlen else t.stride(0)), t.stride(1), t.stride(2)
