"""Forward kernel: O = sigmoid(Q Kᵀ · scale + b) V, one program per (query block, batch · head).

Shape key: B batch, T padded length (or the longest sequence when packed), H query heads, K key/value heads,
D head dim, BD head dim padded to a power of two.

Both layouts go through one kernel. Padded: q [B, T, H, D], sequence b owns rows [0, seq_lens[b]) of its
slice and the rows past it are written as 0. Packed (VARLEN): q [N, H, D] with a zero batch stride and
sequence b owns rows [cu_seqlens[b], cu_seqlens[b + 1]); rows of other sequences are never written.
Key blocks past a sequence's end are never loaded: the key loop stops at the last block that holds a valid
key, and only that block is masked.

The weights' sigmoid and its measured choice: `_tile.sigmoid_parts`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _fwd_ws
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
from ._tile import LOG2E, mma, query_head, sigmoid_from_log2

# SCFM_KERNELS_FWD=triton keeps the Triton forward kernel where the warp-specialized one would run (comparisons).
FWD_KERNEL = os.environ.get("SCFM_KERNELS_FWD", "auto")


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
    b, h, hk, start, n, bias_log2 = query_head(SEQ, BIAS, tl.program_id(1), H, T_MAX, GROUP, VARLEN)

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

    On Hopper with 16-bit inputs and D in `_fwd_ws.HEAD_DIMS` the warp-specialized kernel (`_fwd_ws`) runs, unless
    SCFM_KERNELS_FWD=triton; elsewhere the Triton kernel of this module.

    config (benchmarks): a fixed launch instead of the autotuner, e.g. dict(BLOCK_M=128, BLOCK_N=128,
    num_warps=8, num_stages=3, USE_TMA=True, WS=False) for the Triton kernel (USE_TMA falls back to pointers where
    not allowed), or dict(KERNEL="ws", **one of `_fwd_ws.fwd_ws_configs()`) for the warp-specialized one."""
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
    ws_ok = _fwd_ws.supported(q, meta["USE_TMA"])
    if config is not None and config.get("KERNEL") == "ws":
        if not ws_ok:
            raise ValueError(
                f"config KERNEL='ws' needs Hopper, 16-bit descriptor-friendly q/k/v and D in {_fwd_ws.HEAD_DIMS}; "
                f"got {q.dtype}, D={D} on {q.device}"
            )
        _fwd_ws.launch(args, meta, t_max, B, H, {key: val for key, val in config.items() if key != "KERNEL"})
    elif config is not None:
        config = dict(config)
        config.pop("KERNEL", None)
        meta["USE_TMA"] = config.pop("USE_TMA", True) and meta["USE_TMA"]
        meta["WS"] = config.pop("WS", False)
        _fwd_kernel[(triton.cdiv(t_max, config["BLOCK_M"]), B * H)](*args, **{**meta, **config})
    elif INTERPRET:
        _fwd_kernel[(triton.cdiv(t_max, 16), B * H)](*args, **meta, WS=False, BLOCK_M=16, BLOCK_N=16)
    elif ws_ok and FWD_KERNEL != "triton":
        _fwd_ws.launch(args, meta, t_max, B, H)
    else:
        _fwd_tuned[lambda m: (triton.cdiv(t_max, m["BLOCK_M"]), B * H)](*args, **meta)
    return o[0] if varlen else o


def _bth(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, T, H, D] view; packed tensors have no batch stride."""
    return (0 if varlen else t.stride(0)), t.stride(1), t.stride(2)
