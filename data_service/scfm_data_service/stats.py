"""Gene statistics of an atlas: each gene's median of non-zero normalized expression (Geneformer's gene medians).

Normalized expression = count / cell total × 10 000. The median over all cells expressing the gene is exact
(np.median semantics: mean of the two middle values for an even count) and is computed in two streaming passes
over X, so memory stays at a [genes, 512] histogram plus the values that fall in each gene's median bins:
pass 1 builds per-gene log-spaced histograms; pass 2 keeps only values inside the bins holding the middle order
statistics and picks them exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

TARGET_SUM = 10_000.0
N_HIST = 512
LOG_LO, LOG_HI = -4.0, 7.0  # log10 range of the histogram; values outside fall in the end bins (still exact)

Chunks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # yields (gene int64 [n], value float64 [n])


def _bins(v: np.ndarray) -> np.ndarray:
    b = (np.log10(np.maximum(v, 1e-30)) - LOG_LO) * (N_HIST / (LOG_HI - LOG_LO))
    return np.clip(b.astype(np.int64), 0, N_HIST - 1)


def nonzero_medians(chunks: Chunks, n_genes: int) -> np.ndarray:
    """float32 [n_genes]: exact median of the (positive) values of each gene; 1.0 for genes never seen."""
    hist = np.zeros(n_genes * N_HIST, dtype=np.int64)
    for g, v in chunks():
        hist += np.bincount(g * N_HIST + _bins(v), minlength=n_genes * N_HIST)
    hist = hist.reshape(n_genes, N_HIST)
    cum = np.cumsum(hist, axis=1)
    count = cum[:, -1]
    k_lo, k_hi = (count - 1) // 2, count // 2  # 0-based order statistics of the median
    b_lo = (cum <= k_lo[:, None]).sum(axis=1)  # bin holding order statistic k_lo
    b_hi = (cum <= k_hi[:, None]).sum(axis=1)
    before = np.where(b_lo > 0, cum[np.arange(n_genes), np.maximum(b_lo - 1, 0)], 0)
    keep_g, keep_v = [], []
    for g, v in chunks():
        b = _bins(v)
        m = (b >= b_lo[g]) & (b <= b_hi[g])
        keep_g.append(g[m])
        keep_v.append(v[m])
    med = np.ones(n_genes, dtype=np.float64)
    if keep_g:
        g = np.concatenate(keep_g)
        v = np.concatenate(keep_v)
        order = np.lexsort((v, g))
        g, v = g[order], v[order]
        start = np.searchsorted(g, np.arange(n_genes))
        seen = count > 0
        lo = v[np.minimum(start + k_lo - before, len(v) - 1)]
        hi = v[np.minimum(start + k_hi - before, len(v) - 1)]
        med = np.where(seen, (lo + hi) / 2, 1.0)
    return med.astype(np.float32)


def atlas_gene_medians(uri: str, n_cells: int, n_genes: int, *, progress: bool = False) -> np.ndarray:
    """Gene non-zero medians of normalized expression over the whole atlas at `uri` (float32 [n_genes])."""
    import tiledbsoma as soma

    from scfm_data_service.atlas import CHUNK_CELLS, LAYER, MEASUREMENT

    root = uri.rstrip("/")
    with soma.open(f"{root}/obs") as obs:
        t = obs.read(coords=(slice(0, n_cells - 1),), column_names=["soma_joinid", "raw_sum"]).concat()
    raw_sum = np.zeros(n_cells, dtype=np.float64)
    raw_sum[t["soma_joinid"].to_numpy()] = t["raw_sum"].to_numpy()
    scale = TARGET_SUM / np.maximum(raw_sum, 1e-12)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with soma.open(f"{root}/ms/{MEASUREMENT}/X/{LAYER}") as X:
            for a in range(0, n_cells, CHUNK_CELLS):
                b = min(a + CHUNK_CELLS, n_cells) - 1
                for tbl in X.read(coords=(slice(a, b),)).tables():
                    rows = tbl["soma_dim_0"].to_numpy()
                    yield tbl["soma_dim_1"].to_numpy(), tbl["soma_data"].to_numpy().astype(np.float64) * scale[rows]

    return nonzero_medians(chunks, n_genes)
