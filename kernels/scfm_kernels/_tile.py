"""Device helpers the kernels share: the weights' sigmoid, tile products, sequence bounds.

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

import triton
import triton.language as tl

from ._common import INTERPRET

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
def bias_term(BIAS, b):
    """−bias·log2 e of sequence b, the form the weights' sigmoid takes it in."""
    return -tl.load(BIAS + b) * 1.4426950408889634  # (a jit function sees no float globals)


@triton.jit
def query_head(SEQ, BIAS, pid_bh, H, T_MAX, GROUP: tl.constexpr, VARLEN: tl.constexpr):
    """What a query-side program (axis-1 index pid_bh = b·H + h) works on: (b, h, key head h // GROUP, the
    sequence's first row and length as `seq_bounds` gives them, −bias·log2 e)."""
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    start, n = seq_bounds(SEQ, b, T_MAX, VARLEN)
    return b, h, h // GROUP, start, n, bias_term(BIAS, b)


@triton.jit
def key_head(SEQ, BIAS, pid_bh, HK, T_MAX, VARLEN: tl.constexpr):
    """What a key-side program works on, pid_bh = b·HK + key head (its launch's first pair added): (b, key head,
    the sequence's first row and length as `seq_bounds` gives them, −bias·log2 e)."""
    b = (pid_bh // HK).to(tl.int64)
    start, n = seq_bounds(SEQ, b, T_MAX, VARLEN)
    return b, pid_bh % HK, start, n, bias_term(BIAS, b)
