"""Triton sigmoid attention for scfm: O = sigmoid(Q Kᵀ · scale + b) V, padded and packed, forward and backward.

Public API (see `_op.py` for the supported/not-supported list):
    sigmoid_attention(q, k, v, seq_lens=None, *, bias=None, scale=None)          q [B, T, H, D]
    sigmoid_attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, bias=None, scale=None)   q [N, H, D]
    sigmoid_attention_reference(...)         eager PyTorch oracle, same signature as sigmoid_attention
    sigmoid_attention_varlen_reference(...)  eager oracle for the packed layout
Benchmark: `python -m scfm_kernels.bench` (needs a CUDA GPU).
"""

from ._op import sigmoid_attention, sigmoid_attention_varlen
from .reference import sigmoid_attention_reference, sigmoid_attention_varlen_reference

__all__ = [
    "sigmoid_attention",
    "sigmoid_attention_reference",
    "sigmoid_attention_varlen",
    "sigmoid_attention_varlen_reference",
]
