"""The one place that chooses the attention backend. Everything else calls `attention(q, k, v, seq_lens)`.

Shape key: B cells, T padded tokens, H query heads, K key/value heads (K divides H: grouped-query), D head dim.

Backends (`kind`):
    sigmoid  O = sigmoid(Q Kᵀ/√D − log n_valid) V. CUDA tensors → the Triton kernel `scfm_kernels.sigmoid_attention`;
             CPU tensors → `scfm_kernels.sigmoid_attention_reference` (eager, same numerics in fp32).
             `deterministic=False` picks the kernel's one-pass backward (dQ summed with atomics: a few % faster
             at D=128 on Hopper, last bits of dQ vary run to run; docs/benchmarks.md run 10).
    softmax  PyTorch scaled_dot_product_attention; `softmax_backend` pins the SDPA kernel (auto | flash | cudnn |
             efficient | math). Flash cannot take a padding mask: padded batches on `flash` run on `efficient`.
Both ignore keys at positions ≥ seq_lens and return 0 in rows ≥ seq_lens. scfm_kernels is imported on first use.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_SDPA = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
_warned: set[str] = set()


def attention(
    q_BTHD: torch.Tensor,
    k_BTKD: torch.Tensor,
    v_BTKD: torch.Tensor,
    seq_lens: torch.Tensor | None,
    *,
    kind: str = "sigmoid",
    softmax_backend: str = "auto",
    deterministic: bool = True,
) -> torch.Tensor:
    """Bidirectional attention over each cell's valid tokens: q [B,T,H,D], k/v [B,T,K,D], seq_lens int32 [B] or
    None (no padding) → [B,T,H,D]."""
    if kind == "sigmoid":
        import scfm_kernels

        lens = None if seq_lens is None else seq_lens.to(torch.int32)
        if q_BTHD.is_cuda:
            return scfm_kernels.sigmoid_attention(q_BTHD, k_BTKD, v_BTKD, lens, deterministic=deterministic)
        return scfm_kernels.sigmoid_attention_reference(q_BTHD, k_BTKD, v_BTKD, lens)
    if kind == "softmax":
        return _softmax(q_BTHD, k_BTKD, v_BTKD, seq_lens, softmax_backend)
    raise ValueError(f"attention kind {kind!r} is not one of: sigmoid, softmax")


def _softmax(q_BTHD, k_BTKD, v_BTKD, seq_lens, backend: str) -> torch.Tensor:
    T, H = q_BTHD.shape[1], q_BTHD.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q_BTHD, k_BTKD, v_BTKD))  # [B, H|K, T, D]
    mask_B11T = None
    valid_BT = None
    if seq_lens is not None:
        valid_BT = torch.arange(T, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]
        mask_B11T = valid_BT[:, None, None, :]
    gqa = k.shape[1] != H
    if backend == "auto":
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B11T, enable_gqa=gqa)
    else:
        if backend == "flash" and mask_B11T is not None:
            if "flash" not in _warned:
                _warned.add("flash")
                warnings.warn("flash attention takes no padding mask; padded batches run on efficient", stacklevel=3)
            backend = "efficient"
        if gqa and backend != "math":  # fused kernels want equal head counts
            k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
            gqa = False
        with sdpa_kernel(_SDPA[backend]):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B11T, enable_gqa=gqa)
    o_BTHD = o.transpose(1, 2)
    if valid_BT is not None:
        o_BTHD = o_BTHD * valid_BT[:, :, None, None].to(o_BTHD.dtype)
    return o_BTHD
