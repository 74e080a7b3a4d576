"""`build_aligned_atlas`: one .h5ad file's cells on a reference atlas's gene vocabulary and medians (real SOMA)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import tiledbsoma as soma
from conftest_data import random_counts, write_h5ad

from scfm_data_service import DataError, build_aligned_atlas, ingest, read_obs
from scfm_data_service.atlas import read_meta

REF_GENES = ["ENSG1", "ENSG2", "ENSG3", "ENSG4", "ENSG5", "ENSG6"]


def _x(uri: str) -> np.ndarray:
    meta = read_meta(uri)
    with soma.open(f"{uri}/ms/RNA/X/raw") as X:
        t = X.read().tables().concat()
    m = sp.csr_matrix(
        (t["soma_data"].to_numpy(), (t["soma_dim_0"].to_numpy(), t["soma_dim_1"].to_numpy())),
        shape=(meta["n_cells"], meta["n_genes"]),
    )
    return m.toarray()


def _var(uri: str):
    with soma.open(f"{uri}/ms/RNA/var") as v:
        return v.read().concat().to_pandas().set_index("soma_joinid").sort_index()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ref")
    x = random_counts(np.random.default_rng(0), 40, len(REF_GENES))
    uri = str(d / "atlas")
    ingest(uri, [write_h5ad(d / "train.h5ad", x, REF_GENES, obs={"cell_type": ["T"] * 40})], progress=False)
    return uri


def test_file_cells_on_the_reference_vocabulary(reference, tmp_path):
    rng = np.random.default_rng(1)
    genes = ["UNK1", "ENSG6", "ENSG1", "ENSG3"]  # permuted, one unknown gene, three reference genes missing
    counts = random_counts(rng, 12, len(genes))
    annot = [f"type{i % 3}" for i in range(12)]
    f = write_h5ad(tmp_path / "donor.h5ad", np.log1p(counts), genes, gene_col=None, obs={"annot": annot}, raw=counts)
    uri = str(tmp_path / "aligned")
    res = build_aligned_atlas(uri, f, reference=reference, use_raw=True, obs_columns=["annot"])
    assert (res.n_cells, res.n_file_genes, res.n_matched, res.n_dropped) == (12, 4, 3, 1)
    assert "3 of the file's 4 genes" in res.summary() and "1 dropped" in res.summary()

    assert _var(uri).equals(_var(reference))  # the same genes under the same soma_joinids
    ref_meta, meta = read_meta(reference), read_meta(uri)
    np.testing.assert_array_equal(meta["gene_median"], ref_meta["gene_median"])  # reused, not recomputed
    assert meta["n_genes"] == len(REF_GENES) and meta["n_cells"] == 12
    want = np.zeros((12, len(REF_GENES)), dtype=np.float32)
    for j, g in enumerate(genes):
        if g in REF_GENES:
            want[:, REF_GENES.index(g)] = counts[:, j]
    np.testing.assert_array_equal(_x(uri), want)
    obs = read_obs(uri, ["obs_id", "annot", "cell_type", "dataset_id", "nnz"])
    assert obs.index.tolist() == list(range(12))  # soma_joinid = row of the file
    assert obs["obs_id"].tolist() == [f"donor-c{i}" for i in range(12)]
    assert obs["annot"].tolist() == annot and set(obs["cell_type"]) == {"unknown"}
    assert set(obs["dataset_id"]) == {"donor"} and obs["nnz"].tolist() == list((want > 0).sum(axis=1))


def test_bad_files_fail_with_one_line_and_write_nothing(reference, tmp_path):
    rng = np.random.default_rng(2)
    counts = random_counts(rng, 5, 3)
    neg = counts.copy()
    neg[1, 2] = -1
    cases = [
        (write_h5ad(tmp_path / "sym.h5ad", counts, ["CD3E", "LYZ", "NKG7"]), {}, r"only 0 of its 3 gene ids"),
        (
            write_h5ad(tmp_path / "few.h5ad", random_counts(rng, 5, 20), ["ENSG1", *[f"X{i}" for i in range(19)]]),
            {},
            r"only 1 of its 20 gene ids are in the vocabulary",
        ),
        (
            write_h5ad(tmp_path / "lab.h5ad", counts, REF_GENES[:3], obs={"tissue": ["lung"] * 5}),
            {"obs_columns": ["cell_type"]},
            r"lab\.h5ad: no obs column 'cell_type'; its obs columns: tissue",
        ),
        (write_h5ad(tmp_path / "neg.h5ad", neg, REF_GENES[:3]), {}, r"neg\.h5ad: 1 negative value.*'neg-c1'"),
        (write_h5ad(tmp_path / "dup.h5ad", counts, ["ENSG1", "ENSG2", "ENSG1"]), {}, r"1 duplicate gene id"),
        (write_h5ad(tmp_path / "raw.h5ad", counts, REF_GENES[:3]), {"use_raw": True}, r"raw\.h5ad: has no \.raw"),
        (tmp_path / "missing.h5ad", {}, r"missing\.h5ad: no such file"),
    ]
    for f, kw, pattern in cases:
        uri = tmp_path / f"out-{f.stem}"
        with pytest.raises(DataError, match=pattern) as e:
            build_aligned_atlas(str(uri), f, reference=reference, **kw)
        assert "\n" not in str(e.value) and not uri.exists(), f
    with pytest.raises(DataError, match="already exists"):
        build_aligned_atlas(reference, cases[-2][0], reference=reference)
