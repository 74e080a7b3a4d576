"""Tokenizers, gene medians and length buckets on hand-computed inputs."""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest

from scfm_data_service import CLS_ID, N_SPECIAL, DataError
from scfm_data_service.bucketing import assign_buckets, bucket_batch_cells, bucket_edges
from scfm_data_service.stats import nonzero_medians
from scfm_data_service.tokenize import token_lengths, tokenize


def _csr(cells: list[dict[int, float]]):
    indptr = np.cumsum([0] + [len(c) for c in cells])
    genes = np.array([g for c in cells for g in c], dtype=np.int64)
    counts = np.array([v for c in cells for v in c.values()], dtype=np.float32)
    return indptr, genes, counts


def _cells(off, tok, val):
    return [(tok[a:b].tolist(), val[a:b].tolist()) for a, b in itertools.pairwise(off)]


def test_rank_tokenizer_orders_by_count_over_gene_median():
    # gene medians 1, 2, 10, 1; cell 0 counts 4, 6, 30, 1 → scores ∝ 4, 3, 3, 1 → genes 0, 1, 2 (tie: lower id), 3
    median = np.array([1.0, 2.0, 10.0, 1.0], dtype=np.float32)
    cells = [{0: 4, 1: 6, 2: 30, 3: 1}, {3: 5, 2: 10}, {}]
    off, tok, val = tokenize(*_csr(cells), kind="rank", max_len=10, gene_median=median)
    out = _cells(off, tok, val)
    s = N_SPECIAL
    assert out[0][0] == [CLS_ID, s + 0, s + 1, s + 2, s + 3]
    assert out[1][0] == [CLS_ID, s + 3, s + 2]  # 5/1 > 10/10
    assert out[2][0] == [CLS_ID]
    assert all(v == 0 for _, vals in out for v in vals)


def test_rank_tokenizer_truncates_to_max_len_keeping_top_genes():
    median = np.ones(6, dtype=np.float32)
    cells = [{0: 1, 1: 9, 2: 3, 3: 7, 4: 5, 5: 2}]
    off, tok, _ = tokenize(*_csr(cells), kind="rank", max_len=4, gene_median=median)
    assert tok.tolist() == [CLS_ID, N_SPECIAL + 1, N_SPECIAL + 3, N_SPECIAL + 4]
    assert off.tolist() == [0, 4]


def test_binned_tokenizer_equal_frequency_bins_in_gene_order():
    # counts 5, 1, 3, 3 (n=4), n_bins=5: strict ranks 3, 0, 1, 1 → bins 1 + 4r/4 = 4, 1, 2, 2
    cells = [{7: 5, 2: 1, 4: 3, 0: 3}, {1: 2}]
    off, tok, val = tokenize(*_csr(cells), kind="binned", max_len=10, n_bins=5)
    out = _cells(off, tok, val)
    s = N_SPECIAL
    assert out[0] == ([CLS_ID, s + 0, s + 2, s + 4, s + 7], [0.0, 2.0, 1.0, 2.0, 4.0])
    assert out[1] == ([CLS_ID, s + 1], [0.0, 1.0])


def test_binned_tokenizer_truncation_keeps_highest_counts_bins_from_all_genes():
    # 6 genes, n_bins=4 → bins 1 + 3r/6; keep the top 3 counts (genes 1, 3, 4) with bins from all 6 values
    cells = [{0: 1, 1: 9, 2: 3, 3: 7, 4: 5, 5: 2}]
    _off, tok, val = tokenize(*_csr(cells), kind="binned", max_len=4, n_bins=4)
    s = N_SPECIAL
    assert tok.tolist() == [CLS_ID, s + 1, s + 3, s + 4]
    assert val.tolist() == [0.0, 1 + 3 * 5 // 6, 1 + 3 * 4 // 6, 1 + 3 * 3 // 6]


def test_tokenizer_rejects_unknown_kind_and_tiny_max_len():
    with pytest.raises(DataError, match="allowed: rank, binned"):
        tokenize(*_csr([{0: 1}]), kind="bpe", max_len=8)
    with pytest.raises(DataError, match="max_len"):
        tokenize(*_csr([{0: 1}]), kind="binned", max_len=1)


def test_token_lengths_include_cls_and_truncate():
    assert token_lengths(np.array([0, 5, 300]), 256).tolist() == [1, 6, 256]


def test_nonzero_medians_are_exact():
    rng = np.random.default_rng(0)
    n_genes = 50
    g = rng.integers(0, n_genes - 1, 20_000)  # the last gene is never seen
    v = np.exp(rng.normal(0, 3, len(g)))  # spans many histogram bins, incl. clipped ends
    v[:500] = 1.0  # many equal values
    chunks = lambda: iter([(g[:7000], v[:7000]), (g[7000:], v[7000:])])  # noqa: E731
    med = nonzero_medians(chunks, n_genes)
    want = [np.median(v[g == k]) for k in range(n_genes - 1)]
    np.testing.assert_allclose(med[:-1], want, rtol=1e-6)
    assert med[-1] == 1.0


def test_bucket_edges_bound_padding_and_budget():
    edges = bucket_edges(2048, 1.05)
    assert edges[-1] == 2048 and np.all(np.diff(edges) > 0)
    lo = np.concatenate([[0], edges[:-1]])
    assert np.all((edges - lo - 1) / edges < 0.05 + 1e-9)  # a cell in bucket b has length > lo, ≤ edge
    size = bucket_batch_cells(edges, 16384, 256)
    assert np.all(size * edges <= 16384) and np.all(size >= 1) and size.max() == 256
    assert assign_buckets(np.array([1, 8, 9, 2048]), edges).tolist()[:2] == [0, 7]
    with pytest.raises(DataError, match="tokens_per_batch"):
        bucket_batch_cells(edges, 1000, 8)


@pytest.mark.parametrize("mean_genes", [5, 200])
def test_rank_tokenizer_per_cell_and_packed_sorts_agree(monkeypatch, mean_genes):
    from scfm_data_service import tokenize as tk

    rng = np.random.default_rng(mean_genes)
    n_genes = 3000
    lens = rng.integers(0, 2 * mean_genes, 300)
    genes = np.concatenate([rng.choice(n_genes, k, replace=False) for k in lens]).astype(np.int32)
    counts = rng.integers(1, 8, len(genes)).astype(np.float32)  # many ties: order falls back to gene id
    indptr = np.concatenate([[0], np.cumsum(lens)])
    median = rng.uniform(0.5, 3, n_genes).astype(np.float32)
    got = {}
    for path, threshold, chunk in (("per cell", 0, 1 << 16), ("pieces", 0, 50), ("packed", 1 << 40, 1 << 16)):
        monkeypatch.setattr(tk, "_PER_CELL_SORT", threshold)
        monkeypatch.setattr(tk, "CHUNK_TOKENS", chunk)  # 50: keys built and sorted a few cells at a time
        got[path] = tokenize(indptr, genes, counts, kind="rank", max_len=2 * mean_genes // 3, gene_median=median)
    for path in ("per cell", "pieces"):
        for a, b in zip(got[path], got["packed"], strict=True):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("chunk_tokens", [1 << 16, 300, 1])  # one piece; many pieces; one cell per piece
def test_mask_is_the_k_smallest_draws_of_each_cell(monkeypatch, chunk_tokens):
    """flat_mask against its definition, cell by cell: the k gene positions of smallest (u, position)."""
    tokenize_module = importlib.import_module("scfm_data_service.tokenize")  # the package exports a tokenize()
    from scfm_data_service.datasource import _M1, _M2, _U_BITS, flat_mask

    monkeypatch.setattr(tokenize_module, "CHUNK_TOKENS", chunk_tokens)
    from scfm_data_service.shuffle import splitmix64

    rng = np.random.default_rng(0)
    lens = np.concatenate([[1, 2, 3], rng.integers(1, 400, 200)])
    offsets = np.concatenate([[7], 7 + np.cumsum(lens)])
    joinids = rng.choice(10**6, len(lens), replace=False)
    for ratio, seed, epoch in ((0.15, 0, 0), (0.9, 5, 3), (1.0, 1, 1), (0.001, 2, 9)):
        got = flat_mask(offsets, joinids, ratio=ratio, seed=seed, epoch=epoch)
        key = splitmix64(np.uint64(seed) ^ splitmix64(np.uint64(epoch)))
        for i, (a, b) in enumerate(itertools.pairwise(offsets - offsets[0])):
            c = splitmix64(np.uint64(joinids[i]) ^ key)
            with np.errstate(over="ignore"):
                h = np.arange(b - a, dtype=np.uint64) * _M1 ^ c
                h ^= h >> np.uint64(33)
                h *= _M2
                h ^= h >> np.uint64(33)
            u = np.minimum(h >> np.uint64(64 - _U_BITS), np.uint64((1 << _U_BITS) - 2))
            k = 0 if b - a == 1 else max(1, int(np.rint(ratio * (b - a - 1))))
            order = np.lexsort((np.arange(1, b - a), u[1:]))  # genes only; by (u, position)
            want = np.zeros(b - a, dtype=np.uint8)
            want[1 + order[:k]] = 1
            assert np.array_equal(got[a:b], want), (ratio, i)
    with pytest.raises(DataError, match="CLS"):  # a cell of no tokens cannot come from a tokenizer
        flat_mask(np.array([0, 3, 3, 5]), np.arange(3), ratio=0.5, seed=0, epoch=0)
