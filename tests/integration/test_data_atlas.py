"""Ingest into a real TileDB-SOMA atlas: create, append, shared gene vocabulary, bad input, info, demo."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import tiledbsoma as soma
from conftest_data import SYNTHETIC_CELLS, demo_atlas, random_counts, tree_digest, write_h5ad  # noqa: F401

from scfm_data_service import DataError, atlas_info, ingest, read_obs
from scfm_data_service.atlas import read_meta
from scfm_data_service.stats import TARGET_SUM


def _x(uri: str) -> sp.csr_matrix:
    meta = read_meta(uri)
    with soma.open(f"{uri}/ms/RNA/X/raw") as X:
        t = X.read().tables().concat()
    return sp.csr_matrix(
        (t["soma_data"].to_numpy(), (t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy())),
        shape=(meta["n_cells"], meta["n_genes"]),
    )


def _var(uri: str):
    with soma.open(f"{uri}/ms/RNA/var") as v:
        return v.read().concat().to_pandas().set_index("soma_joinid").sort_index()


@pytest.fixture
def two_files(tmp_path):
    rng = np.random.default_rng(1)
    xa = random_counts(rng, 40, 6)
    xb = random_counts(rng, 30, 5)
    a = write_h5ad(
        tmp_path / "a.h5ad", xa, ["ENSG1", "ENSG2", "ENSG3", "ENSG4", "ENSG5", "ENSG6"], obs={"cell_type": ["T"] * 40}
    )
    b = write_h5ad(
        tmp_path / "b.h5ad", xb, ["ENSG9", "ENSG3", "ENSG1", "ENSG7", "ENSG8"], obs={"tissue": ["lung"] * 30}
    )
    return a, xa, b, xb


def test_create_then_append_keeps_one_growing_vocabulary(tmp_path, two_files):
    a, xa, b, xb = two_files
    uri = str(tmp_path / "atlas")
    assert ingest(uri, [a], progress=False) == ["a"]
    assert _var(uri)["feature_id"].tolist() == ["ENSG1", "ENSG2", "ENSG3", "ENSG4", "ENSG5", "ENSG6"]
    ingest(uri, [b], progress=False)
    var = _var(uri)
    # old ids unchanged; new genes appended in file order
    assert var["feature_id"].tolist() == [
        "ENSG1",
        "ENSG2",
        "ENSG3",
        "ENSG4",
        "ENSG5",
        "ENSG6",
        "ENSG9",
        "ENSG7",
        "ENSG8",
    ]
    assert var.index.tolist() == list(range(9))
    x = _x(uri).toarray()
    np.testing.assert_array_equal(x[:40, :6], xa)
    np.testing.assert_array_equal(x[40:, [6, 2, 0, 7, 8]], xb)
    assert x[40:, [1, 3, 4, 5]].sum() == 0
    obs = read_obs(uri, ["dataset_id", "cell_type", "tissue", "obs_id", "nnz"])
    assert obs.index.tolist() == list(range(70))
    assert obs["dataset_id"].tolist() == ["a"] * 40 + ["b"] * 30
    assert obs["cell_type"].tolist() == ["T"] * 40 + ["unknown"] * 30
    assert obs["tissue"].tolist() == ["unknown"] * 40 + ["lung"] * 30
    assert obs["obs_id"].iloc[0] == "a-c0"
    np.testing.assert_array_equal(obs["nnz"].to_numpy(), (x > 0).sum(axis=1))
    info = atlas_info(uri)
    assert (info["cells"], info["genes"], info["nnz"]) == (70, 9, int((x > 0).sum()))
    assert [d["dataset_id"] for d in info["datasets"]] == ["a", "b"]
    assert info["datasets"][0]["cell_types"] == {"T": 40}
    # stored gene medians = median of non-zero count / cell total × 10 000, per gene
    norm = x / x.sum(axis=1, keepdims=True) * TARGET_SUM
    want = [np.median(norm[norm[:, g] > 0, g]) for g in range(9)]
    np.testing.assert_allclose(read_meta(uri)["gene_median"], want, rtol=1e-5)


def test_use_raw_and_symbol_fallback(tmp_path):
    rng = np.random.default_rng(2)
    counts = random_counts(rng, 10, 4)
    f = write_h5ad(tmp_path / "r.h5ad", np.log1p(counts), ["CD3E", "MS4A1", "LYZ", "NKG7"], gene_col=None, raw=counts)
    uri = str(tmp_path / "atlas")
    ingest(uri, [f], use_raw=True, progress=False)
    np.testing.assert_array_equal(_x(uri).toarray(), counts)
    assert _var(uri)["feature_id"].tolist() == ["CD3E", "MS4A1", "LYZ", "NKG7"]
    with pytest.raises(DataError, match=r"has no \.raw"):
        ingest(str(tmp_path / "other"), [write_h5ad(tmp_path / "n.h5ad", counts, ["a", "b", "c", "d"])], use_raw=True)


def _bad_inputs(tmp_path):
    rng = np.random.default_rng(3)
    good = random_counts(rng, 5, 3)
    neg, nan, inf = good.copy(), good.copy(), good.copy()
    neg[2, 1] = -1
    nan[0, 0] = np.nan
    inf[4, 2] = np.inf
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not hdf5")
    return [
        (write_h5ad(tmp_path / "neg.h5ad", neg, ["g1", "g2", "g3"]), r"neg\.h5ad: 1 negative value.*'neg-c2'.*'g2'"),
        (write_h5ad(tmp_path / "nan.h5ad", nan, ["g1", "g2", "g3"]), r"nan\.h5ad: 1 NaN value"),
        (write_h5ad(tmp_path / "inf.h5ad", inf, ["g1", "g2", "g3"]), r"inf\.h5ad: 1 infinite value"),
        (write_h5ad(tmp_path / "dup.h5ad", good, ["g1", "g2", "g1"]), r"dup\.h5ad: 1 duplicate gene id.*'g1'"),
        (write_h5ad(tmp_path / "empty.h5ad", good[:0], ["g1", "g2", "g3"]), r"empty\.h5ad: no cells"),
        (junk, r"junk\.h5ad: cannot read as \.h5ad"),
        (tmp_path / "missing.h5ad", r"missing\.h5ad: no such file"),
    ]


def test_bad_input_fails_with_one_line_and_leaves_atlas_unchanged(tmp_path, two_files):
    a, _, b, _ = two_files
    uri = str(tmp_path / "atlas")
    ingest(uri, [a], progress=False)
    before = tree_digest(uri)
    for bad, pattern in _bad_inputs(tmp_path):
        with pytest.raises(DataError, match=pattern) as e:
            ingest(uri, [b, bad], progress=False)  # the good file first: still nothing may be written
        assert "\n" not in str(e.value)
        assert tree_digest(uri) == before, bad
    with pytest.raises(DataError, match="already in the atlas"):
        ingest(uri, [a], progress=False)
    assert tree_digest(uri) == before
    # a bad first file never creates the atlas
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError):
        ingest(str(fresh), [_bad_inputs(tmp_path)[0][0]], progress=False)
    assert not fresh.exists()


def test_demo_atlas_has_labelled_pbmc_and_synthetic_cells(demo_atlas):  # noqa: F811
    info = atlas_info(demo_atlas)
    by_id = {d["dataset_id"]: d for d in info["datasets"]}
    assert by_id["pbmc68k_reduced"]["cells"] == 700
    assert by_id["synthetic"]["cells"] == SYNTHETIC_CELLS
    assert "CD14+ Monocyte" in by_id["pbmc68k_reduced"]["cell_types"]
    assert len(by_id["synthetic"]["cell_types"]) == 8
    obs = read_obs(demo_atlas, ["dataset_id", "nnz"])
    syn = obs[obs["dataset_id"] == "synthetic"]["nnz"]
    assert syn.min() >= 100 and syn.quantile(0.9) > 1000  # hundreds to thousands of genes per cell
    x = _x(demo_atlas)
    assert np.all(x.data == np.rint(x.data)) and x.data.min() >= 1  # integer raw counts, PBMC included


@pytest.mark.parametrize("max_segments", [256, -1])  # -1: every read takes the sort-by-row path
def test_read_csr_returns_the_asked_rows_in_the_asked_order(demo_atlas, monkeypatch, max_segments):  # noqa: F811
    from scfm_data_service import datasource
    from scfm_data_service.datasource import AtlasReader

    monkeypatch.setattr(datasource, "_MAX_SEGMENTS", max_segments)

    x = _x(demo_atlas)
    reader = AtlasReader(demo_atlas)
    rng = np.random.default_rng(0)
    n = x.shape[0]
    cases = [
        rng.permutation(np.arange(100, 900)),  # one range read, rows read through small gaps
        rng.permutation(np.concatenate([np.arange(0, 300), np.arange(n - 300, n)])),  # two ranges
        rng.choice(n, 40, replace=False),  # many small runs: one point read
        np.array([n - 1, 0]),
    ]
    for cells in cases:
        indptr, genes, counts = reader.read_csr(cells)
        want = x[cells]
        want.sort_indices()
        assert np.array_equal(indptr, want.indptr)
        for i in range(len(cells)):  # the order within a cell is free; compare as sorted (gene, count) pairs
            a, b = indptr[i], indptr[i + 1]
            o = np.argsort(genes[a:b])
            assert np.array_equal(genes[a:b][o], want.indices[a:b]) and np.allclose(counts[a:b][o], want.data[a:b])
    with pytest.raises(DataError, match="repeated"):
        reader.read_csr(np.array([3, 5, 3]))
