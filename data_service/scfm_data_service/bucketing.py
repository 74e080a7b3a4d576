"""Length buckets: cells of similar token length go in the same batch, so padding stays a small fraction.

Bucket edges grow geometrically by `ratio` (ints, strictly increasing, last = max_len). A cell of length L falls
in the first bucket whose edge is ≥ L; a batch of bucket b holds at most min(max_cells, tokens_per_batch // edge_b)
cells, so B × T ≤ tokens_per_batch for every batch (T = longest cell, padding counted). Padding per cell is below
1 - 1/ratio of the edge (≈ 4.8% for ratio 1.05).
"""

from __future__ import annotations

import numpy as np

from scfm_data_service.errors import DataError


def bucket_edges(max_len: int, ratio: float = 1.05, first: int = 8) -> np.ndarray:
    """int64 [K]: upper length edge of each bucket, the last one max_len."""
    if ratio <= 1.0:
        raise DataError(f"data.bucket_ratio={ratio} must be > 1 (e.g. 1.05)")
    edges = list(range(1, min(first, max_len) + 1))
    e = float(edges[-1])
    while edges[-1] < max_len:
        e *= ratio
        edges.append(min(max_len, max(edges[-1] + 1, int(np.floor(e)))))
    return np.asarray(edges, dtype=np.int64)


def bucket_batch_cells(edges: np.ndarray, tokens_per_batch: int, max_cells: int) -> np.ndarray:
    """int64 [K]: cells per batch in each bucket."""
    if tokens_per_batch < edges[-1]:
        raise DataError(
            f"data.tokens_per_batch={tokens_per_batch} is below data.max_len={int(edges[-1])}; a batch must hold at "
            "least one full-length cell"
        )
    if max_cells < 1:
        raise DataError(f"data.max_cells_per_batch={max_cells} must be ≥ 1")
    return np.minimum(max_cells, tokens_per_batch // edges)


def assign_buckets(lengths: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """int64 [N]: bucket index of each cell length."""
    return np.searchsorted(edges, lengths, side="left")


def padding_fraction(batch_lengths: list[np.ndarray]) -> float:
    """Padded tokens / all batch tokens (B × T summed), for batches given as arrays of cell lengths."""
    total = sum(int(len(b) * b.max()) for b in batch_lengths if len(b))
    real = sum(int(b.sum()) for b in batch_lengths)
    return 0.0 if total == 0 else 1.0 - real / total
