"""Sigmoid attention as torch custom ops (forward, backward), their autograd link, and the public functions.

Shape key: B batch, T padded length, N packed tokens, H query heads, K key/value heads, D head dim.

Supported:
  - q/k/v float16, bfloat16 (float32 accumulation) and float32 (IEEE float32 products), on CUDA;
  - head dims 16..256, non-powers of two included (padded to the next power of two inside the kernels);
  - GQA/MQA: k/v with K heads where H is a multiple of K;
  - trailing padding per sequence (`seq_lens`) and packed sequences (`cu_seqlens`);
  - forward (on Hopper, 16-bit, D 64 or 128: a warp-specialized Gluon kernel, `_fwd_ws`; SCFM_KERNELS_FWD=triton
    keeps the Triton kernel) and a deterministic backward (no atomics) for q, k and v (in 16-bit on Hopper at head
    dims 64 and 97-128 it stores dSᵀ in a scratch buffer capped by SCFM_KERNELS_DS_SCRATCH_MIB, default 1/16 of
    the GPU's memory; 0 turns that off; at 64 and 128 a warp-specialized dK/dV kernel, `_bwd_ws`,
    SCFM_KERNELS_BWD=triton keeps the Triton one); `deterministic=False` opts into a
    one-pass backward (bf16/fp16 on Hopper) that adds dQ with bulk reduces (at D = 64 in the warp-specialized
    dK/dV kernel): fewer tile products, no dSᵀ through memory, run-to-run differences in the last bits of dQ;
  - torch.compile: both directions are `torch.library` custom ops (`scfm::sigmoid_attn_fwd`/`_bwd`), so a
    compiled model traces through them with no graph break. Eager calls take an `autograd.Function` over the same
    two functions instead: the custom op's dispatch costs about 5x its host time per call (46 against 10 µs on a
    2-core CPU), which at short sequences is the GPU's time too (docs/benchmarks.md, run 20).
Not supported: causal or arbitrary masks, per-token biases, a gradient for the bias, different q and k
lengths (cross-attention), float64 (use `sigmoid_attention_reference`).

With TRITON_INTERPRET=1 the Triton kernels run in Triton's interpreter on CPU tensors (forward and
backward); that is how the tests exercise them. Without it, CPU tensors go to the eager reference.
"""

from __future__ import annotations

import math

import torch

from ._bwd import attention_backward
from ._common import INTERPRET
from ._fwd import attention_forward
from ._validate import check_padded, check_sequence_extent, check_varlen
from .reference import sigmoid_attention_reference, sigmoid_attention_varlen_reference


@torch.library.custom_op("scfm::sigmoid_attn_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq: torch.Tensor,
    bias_B: torch.Tensor,
    scale: float,
    varlen: bool,
    max_seqlen: int,
    deterministic: bool,
) -> torch.Tensor:
    return attention_forward(q, k, v, seq, bias_B, scale, varlen, max_seqlen)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, seq, bias_B, scale, varlen, max_seqlen, deterministic):
    return q.new_empty(q.shape)


@torch.library.custom_op("scfm::sigmoid_attn_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq: torch.Tensor,
    bias_B: torch.Tensor,
    scale: float,
    varlen: bool,
    max_seqlen: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, seq, bias_B, scale, varlen, max_seqlen, deterministic=deterministic)


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, seq, bias_B, scale, varlen, max_seqlen, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, seq, bias_B, scale, varlen, max_seqlen, deterministic = inputs
    ctx.save_for_backward(q, k, v, seq, bias_B)
    ctx.scale, ctx.varlen, ctx.max_seqlen, ctx.deterministic = scale, varlen, max_seqlen, deterministic


def _grads(ctx, do: torch.Tensor, backward) -> tuple:
    """dq, dk, dv from `backward` (`_bwd_op`, or `attention_backward` itself) at ctx's saved inputs, then None for
    each input that takes no gradient."""
    q, k, v, seq, bias_B = ctx.saved_tensors
    args = (seq, bias_B, ctx.scale, ctx.varlen, ctx.max_seqlen)
    dq, dk, dv = backward(do.contiguous(), q, k, v, *args, deterministic=ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None


def _backward(ctx, do: torch.Tensor):
    return _grads(ctx, do, _bwd_op)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The custom ops' forward and backward, linked by autograd without the op dispatcher (eager calls)."""

    @staticmethod
    def forward(ctx, q, k, v, seq, bias_B, scale, varlen, max_seqlen, deterministic):
        _setup_context(ctx, (q, k, v, seq, bias_B, scale, varlen, max_seqlen, deterministic), None)
        return attention_forward(q, k, v, seq, bias_B, scale, varlen, max_seqlen)

    @staticmethod
    def backward(ctx, do):
        return _grads(ctx, do, attention_backward)


def _attend(*args) -> torch.Tensor:
    """The forward through the custom op while torch.compile traces, through `_EagerAttention` otherwise."""
    if torch.compiler.is_compiling():
        return _fwd_op(*args)
    return _EagerAttention.apply(*args)


def _bias_vector(n_valid_B: torch.Tensor, bias: float | None, max_len: int | None = None) -> torch.Tensor:
    """float32 [B]: `bias` for every sequence, or the default −log(n) of each length n clamped to [1, max_len]
    (`reference.default_bias` in three small ops instead of five)."""
    out = torch.empty(n_valid_B.shape, dtype=torch.float32, device=n_valid_B.device)
    if bias is not None:
        return out.fill_(float(bias))
    return torch.log(n_valid_B.clamp(1, max_len), out=out).neg_()


def _last_dim_contiguous(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def sigmoid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor | None = None,
    *,
    bias: float | None = None,
    scale: float | None = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """Sigmoid attention over a padded batch: O = sigmoid(Q Kᵀ · scale + b) V.

    Args:
        q: [B, T, H, D] float16 / bfloat16 / float32.
        k, v: [B, T, K, D], same dtype and device as q; H must be a multiple of K (GQA/MQA).
        seq_lens: int32 [B], valid tokens per sequence (trailing padding), each in [0, T]; None means all T.
            Keys past seq_lens[b] are never loaded; query rows past it are written as 0 and get zero grads.
        bias: the b above. None means −log(seq_lens[b]) per sequence; a float overrides it for all.
        scale: None means 1/√D.
        deterministic: False opts into the one-pass backward (dQ summed with atomics; bf16/fp16 on Hopper).

    Returns:
        [B, T, H, D] in q's dtype.
    """
    check_padded(q, k, v, seq_lens)
    B, T, _, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if q.device.type == "cpu" and not INTERPRET:
        return sigmoid_attention_reference(q, k, v, seq_lens, bias=bias, scale=scale)
    if seq_lens is None:
        seq_lens = torch.full((B,), T, dtype=torch.int32, device=q.device)
    q, k, v = _last_dim_contiguous(q, k, v)
    check_sequence_extent(T, q=q, k=k, v=v)
    bias_B = _bias_vector(seq_lens, bias, T)
    return _attend(q, k, v, seq_lens, bias_B, scale, False, T, bool(deterministic))


def sigmoid_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    bias: float | None = None,
    scale: float | None = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """Sigmoid attention over packed sequences: O = sigmoid(Q Kᵀ · scale + b) V within each sequence.

    Args:
        q: [N, H, D] float16 / bfloat16 / float32, sequences packed back to back.
        k, v: [N, K, D], same dtype and device as q; H must be a multiple of K (GQA/MQA).
        cu_seqlens: int32 [B + 1], sequence b owns tokens [cu_seqlens[b], cu_seqlens[b + 1]);
            non-decreasing, cu_seqlens[0] = 0 and cu_seqlens[B] = N.
        max_seqlen: an upper bound on the longest sequence (sets the grid; too small drops rows).
        bias: None means −log(length of the sequence) per sequence; a float overrides it for all.
        scale: None means 1/√D.
        deterministic: False opts into the one-pass backward (dQ summed with atomics; bf16/fp16 on Hopper).

    Returns:
        [N, H, D] in q's dtype.
    """
    check_varlen(q, k, v, cu_seqlens, max_seqlen)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.device.type == "cpu" and not INTERPRET:
        return sigmoid_attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, bias=bias, scale=scale)
    q, k, v = _last_dim_contiguous(q, k, v)
    check_sequence_extent(max_seqlen, q=q, k=k, v=v)
    bias_B = _bias_vector(cu_seqlens[1:] - cu_seqlens[:-1], bias)  # (the kernels clamp no packed length)
    return _attend(q, k, v, cu_seqlens, bias_B, scale, True, max_seqlen, bool(deterministic))
