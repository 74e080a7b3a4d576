"""Input checks for the public functions: every error names what was given and what is expected.

Shape key: B batch, T padded length, N packed tokens, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SEQUENCE_ELEMENTS = 2**31  # the kernels address inside one sequence with 32-bit offsets
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _check_common(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, reference: bool) -> None:
    names = {"q": q, "k": k, "v": v}
    for name, t in names.items():
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    allowed = (*SUPPORTED_DTYPES, torch.float64) if reference else SUPPORTED_DTYPES
    if q.dtype not in allowed:
        _fail(f"q has dtype {q.dtype}; expected one of {', '.join(str(d) for d in allowed)}")
    for name in ("k", "v"):
        t = names[name]
        if t.dtype != q.dtype:
            _fail(f"{name} has dtype {t.dtype} but q has {q.dtype}; expected q, k and v to share one dtype")
        if t.device != q.device:
            _fail(f"{name} is on {t.device} but q is on {q.device}; expected q, k and v on one device")
    if k.shape != v.shape:
        _fail(f"k has shape {tuple(k.shape)} and v has {tuple(v.shape)}; expected equal shapes {layout}")
    d = q.shape[-1]
    if k.shape[-1] != d:
        _fail(f"k has head dim {k.shape[-1]} but q has {d}; expected equal head dims")
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        _fail(f"head dim D={d} (q shape {tuple(q.shape)}); expected {MIN_HEAD_DIM} <= D <= {MAX_HEAD_DIM}")
    h, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or h % hk != 0:
        _fail(
            f"q has {h} heads and k/v have {hk}; expected the query head count to be a multiple of the "
            f"key/value head count (GQA/MQA)"
        )


def check_padded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None, reference: bool = False
) -> None:
    """Checks q [B, T, H, D], k/v [B, T, K, D] and seq_lens int32 [B] (or None)."""
    layout = "[B, T, H, D] (k/v [B, T, K, D])"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.dim() != 4:
            _fail(f"{name} has shape {tuple(t.shape)} ({t.dim()} dims); expected 4 dims {layout}")
    _check_common(q, k, v, layout, reference)
    if k.shape[:2] != q.shape[:2]:
        _fail(
            f"k has shape {tuple(k.shape)} and q has {tuple(q.shape)}; expected the same [B, T] = {tuple(q.shape[:2])}"
        )
    if seq_lens is not None:
        _check_int_vector("seq_lens", seq_lens, q.shape[0], "[B]", q.device)


def check_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    reference: bool = False,
) -> None:
    """Checks q [N, H, D], k/v [N, K, D], cu_seqlens int32 [B + 1] and max_seqlen > 0."""
    layout = "[N, H, D] (k/v [N, K, D])"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.dim() != 3:
            _fail(f"{name} has shape {tuple(t.shape)} ({t.dim()} dims); expected 3 dims {layout}")
    _check_common(q, k, v, layout, reference)
    if k.shape[0] != q.shape[0]:
        _fail(f"k has {k.shape[0]} tokens and q has {q.shape[0]}; expected the same N")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        got = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        _fail(f"cu_seqlens is {got}; expected an int32 tensor [B + 1] with B >= 1")
    _check_int_vector("cu_seqlens", cu_seqlens, cu_seqlens.numel(), "[B + 1]", q.device)
    if not isinstance(max_seqlen, int) or max_seqlen < 1:
        _fail(f"max_seqlen is {max_seqlen!r}; expected a positive int (the longest sequence in the pack)")


def _check_int_vector(name: str, t: torch.Tensor, n: int, shape: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} is {type(t).__name__}; expected an int32 tensor {shape}")
    if t.dtype != torch.int32:
        _fail(f"{name} has dtype {t.dtype}; expected torch.int32 {shape}")
    if tuple(t.shape) != (n,):
        _fail(f"{name} has shape {tuple(t.shape)}; expected {shape} = ({n},)")
    if t.device != device:
        _fail(f"{name} is on {t.device} but q is on {device}; expected the same device")


def check_sequence_extent(rows: int, **tensors: torch.Tensor) -> None:
    """Checks that one sequence of `rows` tokens of each tensor (token dim −3, heads −2, head dim −1), and of the
    contiguous outputs and gradients of its shape, spans fewer than 2³¹ elements: the kernels add a sequence's
    row, head and column offsets in 32 bits (the batch's and the packed start's in 64)."""
    for name, t in tensors.items():
        heads, d = t.shape[-2], t.shape[-1]
        last = (rows - 1) * abs(t.stride(-3)) + (heads - 1) * abs(t.stride(-2)) + (d - 1) * abs(t.stride(-1))
        span = max(last + 1, rows * heads * d)
        if rows > 0 and span >= MAX_SEQUENCE_ELEMENTS:
            _fail(
                f"{name} {tuple(t.shape)}: one sequence of {rows} tokens spans {span:,} elements (strides "
                f"{tuple(t.stride())}); expected fewer than 2^31 = {MAX_SEQUENCE_ELEMENTS:,} per sequence, as the "
                f"kernels index within a sequence with 32-bit offsets (use shorter sequences or fewer heads)"
            )
