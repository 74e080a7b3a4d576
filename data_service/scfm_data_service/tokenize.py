"""Tokenizers: raw counts of a group of cells (CSR) → ragged token ids and values, CLS first.

Both take cell rows as CSR (indptr int64 [N+1], genes int64 [nnz] = atlas gene index, counts float [nnz]) and
return CSR-like (offsets int64 [N+1], tokens int32 [M], values float32 [M]). Token id of gene g = N_SPECIAL + g.
Each cell becomes [CLS, gene tokens...] with at most max_len tokens in all.

- rank (Geneformer rank-value): expressed genes ordered by count / gene's non-zero median over the atlas (float32;
  dividing by the cell total, common to all of a cell's genes, would not change the order), highest first (ties:
  lower gene id first), truncated to max_len - 1 genes. Values are 0. One np.sort of packed uint64 keys
  (cell | score bits | gene) orders a whole read unit at once.
- binned (scGPT binned-value): each expressed gene's count is binned per cell into n_bins - 1 equal-frequency
  bins, bin = 1 + floor((n_bins - 1) * r / n) where n is the cell's expressed-gene count and r the number of
  its values strictly below this one (equal counts share a bin; 0 is reserved for "not expressed"). If a cell
  has more than max_len - 1 expressed genes, the highest counts are kept (ties: lower gene id). Tokens are in
  gene-id order; values are the bins (float).
"""

from __future__ import annotations

import itertools

import numpy as np

from scfm_data_service.errors import DataError
from scfm_data_service.schema import CLS_ID, N_SPECIAL

TOKENIZERS = ("rank", "binned")


def _rows(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))


def _with_cls(indptr, sel_rows, tokens, values, n_cells) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Insert CLS (value 0) before each cell's tokens; tokens/values are grouped by row in sel_rows."""
    per_cell = np.bincount(sel_rows, minlength=n_cells) + 1
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(per_cell, out=offsets[1:])
    out_t = np.full(offsets[-1], CLS_ID, dtype=np.int32)
    out_v = np.zeros(offsets[-1], dtype=np.float32)
    # position of each kept token: its cell's start + 1 + index within the cell
    starts = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(per_cell - 1, out=starts[1:])
    within = np.arange(len(sel_rows)) - starts[sel_rows]
    pos = offsets[sel_rows] + 1 + within
    out_t[pos] = tokens
    out_v[pos] = values
    return offsets, out_t, out_v


CHUNK_TOKENS = 1 << 16  # per-token work runs over cache-sized pieces (~0.5 MB per uint64 temporary)


def token_chunks(offsets: np.ndarray, max_cells: int) -> list[tuple[int, int]]:
    """[a, b) ranges of the cells of CSR `offsets`, about CHUNK_TOKENS tokens each (≥ 1 cell, ≤ max_cells)."""
    n, bounds, a = len(offsets) - 1, [], 0
    while a < n:
        b = int(np.searchsorted(offsets, offsets[a] + CHUNK_TOKENS, side="right")) - 1
        b = min(max(b, a + 1), a + max_cells, n)
        bounds.append((a, b))
        a = b
    return bounds


_PER_CELL_SORT = 32  # mean genes per cell from which sorting each cell on its own beats one packed sort


def _rank_keys(genes: np.ndarray, counts: np.ndarray, median: np.ndarray, g_bits: int) -> np.ndarray:
    """uint64 [nnz]: ~score bits (float32 count / gene median, 31 bits; highest score lowest key) | gene."""
    score = np.asarray(counts, dtype=np.float32) / median[genes]
    key = np.subtract(np.uint32(0x7FFFFFFF), score.view(np.uint32)).astype(np.uint64)
    key <<= np.uint64(g_bits)
    key |= genes.astype(np.uint64)
    return key


def _rank(indptr: np.ndarray, genes: np.ndarray, counts: np.ndarray, median: np.ndarray, keep: int):
    """Rank tokens (offsets, tokens int32, values float32): per cell, genes by (score desc, gene id) after CLS.

    Packed uint64 keys ~score bits (float32, 31 bits) | gene, sorted cell by cell in place (cells of ≥ 32 genes on
    average: many small sorts stay in cache and beat one big one), else one np.sort per chunk of cells with the
    cell in the top bits."""
    g_bits = max(1, int(len(median) - 1).bit_length())
    sh = 31 + g_bits
    if sh >= 63:
        raise DataError(f"{len(median)} genes are too many for the rank tokenizer's packed sort keys")
    n_cells = len(indptr) - 1
    lens = np.diff(indptr)
    g_mask = np.uint64((1 << g_bits) - 1)
    if n_cells and int(indptr[-1]) >= _PER_CELL_SORT * n_cells:
        first = int(indptr[0])
        tok = np.empty(int(indptr[-1]) - first, dtype=np.int32)
        for a, b in token_chunks(indptr, n_cells):  # keys of a cache-sized piece of cells at a time
            lo, hi = int(indptr[a]), int(indptr[b])
            key = _rank_keys(genes[lo:hi], counts[lo:hi], median, g_bits)
            for x, y in itertools.pairwise((indptr[a : b + 1] - lo).tolist()):
                key[x:y].sort()
            key &= g_mask
            tok[lo - first : hi - first] = key
    else:
        step = 1 << (64 - sh)
        parts = []
        for a in range(0, max(n_cells, 1), step):  # cells per sort bounded by the cell field
            b = min(a + step, n_cells)
            lo, hi = int(indptr[a]), int(indptr[b])
            key = _rank_keys(genes[lo:hi], counts[lo:hi], median, g_bits)
            key += np.repeat(np.arange(b - a, dtype=np.uint64) << np.uint64(sh), lens[a:b])
            key.sort()
            parts.append(key)
        key = np.concatenate(parts) if len(parts) > 1 else parts[0]
        tok = (key & g_mask).astype(np.int32)
    tok += N_SPECIAL
    if len(lens) and lens.max() > keep:  # truncate to the top `keep` genes (rows stay grouped in order)
        within = np.arange(len(tok)) - np.repeat(indptr[:-1], lens)
        tok = tok[within < keep]
        lens = np.minimum(lens, keep)
    offsets = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(lens + 1, out=offsets[1:])
    starts = offsets[:-1] - np.arange(n_cells)  # CLS goes before each cell's first token
    tok = np.insert(tok, starts, np.int32(CLS_ID))
    return offsets, tok, np.zeros(len(tok), dtype=np.float32)


def tokenize(
    indptr: np.ndarray,
    genes: np.ndarray,
    counts: np.ndarray,
    *,
    kind: str,
    max_len: int,
    n_bins: int = 51,
    gene_median: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize N cells given as CSR; returns (offsets int64 [N+1], tokens int32 [M], values float32 [M])."""
    if kind not in TOKENIZERS:
        raise DataError(f"data.tokenizer={kind!r} is not a tokenizer; allowed: {', '.join(TOKENIZERS)}")
    if max_len < 2:
        raise DataError(f"data.max_len={max_len} leaves no room for genes after CLS; use max_len ≥ 2")
    n_cells = len(indptr) - 1
    keep_genes = max_len - 1
    if kind == "rank":
        if gene_median is None:
            raise DataError("rank tokenizer needs the atlas gene medians (ingest computes them)")
        indptr = np.asarray(indptr, dtype=np.int64)
        return _rank(indptr, np.asarray(genes), counts, np.asarray(gene_median, dtype=np.float32), keep_genes)
    genes = np.asarray(genes, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.float64)
    rows = _rows(indptr)

    if n_bins < 2:
        raise DataError(f"data.n_bins={n_bins} is too small; the binned tokenizer needs n_bins ≥ 2")
    # equal-frequency bins from each value's strict rank within its cell
    asc = np.lexsort((counts, rows))
    c_sorted, r_sorted = counts[asc], rows[asc]
    new_group = np.ones(len(asc), dtype=bool)
    new_group[1:] = (c_sorted[1:] != c_sorted[:-1]) | (r_sorted[1:] != r_sorted[:-1])
    first_idx = np.maximum.accumulate(np.where(new_group, np.arange(len(asc)), 0))
    strict_rank = np.empty(len(asc), dtype=np.int64)
    strict_rank[asc] = first_idx - indptr[r_sorted]
    n_row = np.diff(indptr)[rows]
    bins = 1 + ((n_bins - 1) * strict_rank) // np.maximum(n_row, 1)
    # keep the top max_len-1 counts per cell, then emit in gene order
    desc = np.lexsort((genes, -counts, rows))
    within = np.arange(len(desc)) - indptr[rows[desc]]
    sel = desc[within < keep_genes]
    sel = sel[np.lexsort((genes[sel], rows[sel]))]
    return _with_cls(
        indptr, rows[sel], (genes[sel] + N_SPECIAL).astype(np.int32), bins[sel].astype(np.float32), n_cells
    )


def token_lengths(nnz: np.ndarray, max_len: int) -> np.ndarray:
    """int64 [N]: tokens per cell (CLS included) for cells with `nnz` expressed genes."""
    return 1 + np.minimum(np.asarray(nnz, dtype=np.int64), max_len - 1)
