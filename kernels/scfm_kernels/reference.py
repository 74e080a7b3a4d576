"""Eager PyTorch oracle for sigmoid attention: O = sigmoid(Q Kᵀ · scale + b) V.

Shape key: B batch, T padded length, N packed tokens, H query heads, K key/value heads, D head dim.

Computes in float32 for half inputs (float64 stays float64) and returns the input dtype. Materialises the
[B, H, T, T] score matrix, so it is meant for tests and for small CPU runs, not for long sequences.
"""

from __future__ import annotations

import itertools
import math

import torch

from ._validate import check_padded, check_varlen


def default_bias(n_valid_BL: torch.Tensor) -> torch.Tensor:
    """b = −log(n_valid_keys) per sequence, as float32; empty sequences get 0 (they attend to nothing)."""
    return -torch.log(n_valid_BL.clamp(min=1).to(torch.float32))


def sigmoid_attention_reference(
    q_BTHD: torch.Tensor,
    k_BTKD: torch.Tensor,
    v_BTKD: torch.Tensor,
    seq_lens: torch.Tensor | None = None,
    *,
    bias: float | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference for `sigmoid_attention`: q [B, T, H, D], k/v [B, T, K, D], seq_lens int32 [B] → [B, T, H, D].

    Keys at positions ≥ seq_lens[b] are ignored and rows at positions ≥ seq_lens[b] are 0. Differentiable.
    """
    check_padded(q_BTHD, k_BTKD, v_BTKD, seq_lens, reference=True)
    B, T, H, D = q_BTHD.shape
    group = H // k_BTKD.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cdtype = torch.float64 if q_BTHD.dtype == torch.float64 else torch.float32
    if seq_lens is None:
        seq_lens = torch.full((B,), T, dtype=torch.int32, device=q_BTHD.device)
    lens_B = seq_lens.to(torch.int64).clamp(0, T)
    if bias is None:
        bias_B = default_bias(lens_B).to(cdtype)
    else:
        bias_B = torch.full((B,), float(bias), dtype=cdtype, device=q_BTHD.device)

    q = q_BTHD.to(cdtype)
    k = k_BTKD.to(cdtype).repeat_interleave(group, dim=2)
    v = v_BTKD.to(cdtype).repeat_interleave(group, dim=2)
    s_BHTT = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale + bias_B[:, None, None, None]
    valid_BT = torch.arange(T, device=q.device)[None, :] < lens_B[:, None]
    p_BHTT = torch.sigmoid(s_BHTT) * valid_BT[:, None, None, :].to(cdtype)
    o_BTHD = torch.einsum("bhqk,bkhd->bqhd", p_BHTT, v)
    o_BTHD = o_BTHD * valid_BT[:, :, None, None].to(cdtype)
    return o_BTHD.to(q_BTHD.dtype)


def sigmoid_attention_varlen_reference(
    q_NHD: torch.Tensor,
    k_NKD: torch.Tensor,
    v_NKD: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    bias: float | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference for `sigmoid_attention_varlen`: packed q [N, H, D], k/v [N, K, D], cu_seqlens [B + 1]."""
    check_varlen(q_NHD, k_NKD, v_NKD, cu_seqlens, max_seqlen, reference=True)
    out = torch.zeros_like(q_NHD)
    bounds = cu_seqlens.tolist()
    pieces = []
    for start, end in itertools.pairwise(bounds):
        if end <= start:
            continue
        o = sigmoid_attention_reference(
            q_NHD[None, start:end], k_NKD[None, start:end], v_NKD[None, start:end], bias=bias, scale=scale
        )
        pieces.append((start, end, o[0]))
    if not pieces:
        return out
    return torch.cat(
        [out[: pieces[0][0]], *[o for _, _, o in pieces], out[pieces[-1][1] :]],
        dim=0,
    )
