"""`launch eval CHECKPOINT --data FILE.h5ad`: a file's cells tokenized on the training atlas's vocabulary and
medians. Reuses the tiny trained checkpoint of conftest.py; the file holds exactly the atlas's counts of some of
its cells (genes permuted, some absent, unknown genes added), so its embeddings must equal the atlas path's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from test_eval_checkpoint import _launch  # `trained` is the session-scoped fixture of conftest.py


def _atlas_counts(atlas: str, joinids: np.ndarray):
    """(counts csr [n, G] of `joinids` in that order, var feature_id [G]) read straight from the atlas."""
    import scipy.sparse as sp
    import tiledbsoma as soma

    from scfm_data_service.atlas import read_meta

    n_genes = read_meta(atlas)["n_genes"]
    with soma.open(f"{atlas}/ms/RNA/X/raw") as X:
        t = X.read(coords=(joinids,)).tables().concat()
    rows = np.searchsorted(np.sort(joinids), t["soma_dim_0"].to_numpy())
    order = np.argsort(joinids)
    x = sp.csr_matrix(
        (t["soma_data"].to_numpy(), (order[rows], t["soma_dim_1"].to_numpy())), shape=(len(joinids), n_genes)
    )
    with soma.open(f"{atlas}/ms/RNA/var") as v:
        var = v.read().concat().to_pandas().sort_values("soma_joinid")
    return x, var["feature_id"].astype(str).to_numpy()


@pytest.fixture(scope="module")
def donor_file(trained, tmp_path_factory):
    """(path, atlas joinids of its rows, annot labels): 150 atlas cells in shuffled order, as an .h5ad of counts."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    import scfm_data_service

    atlas = trained[0]
    rng = np.random.default_rng(0)
    obs = scfm_data_service.read_obs(atlas, ["cell_type", "dataset_id"])
    pbmc = obs.index[obs["dataset_id"] == "pbmc68k_reduced"].to_numpy()
    syn = obs.index[obs["dataset_id"] != "pbmc68k_reduced"].to_numpy()
    joinids = rng.permutation(
        np.concatenate([rng.choice(pbmc, 110, replace=False), rng.choice(syn, 40, replace=False)])
    )
    x, genes = _atlas_counts(atlas, joinids)
    expressed = np.flatnonzero(np.asarray((x > 0).sum(axis=0)).ravel())
    silent = np.setdiff1d(np.arange(len(genes)), expressed)
    cols = np.concatenate([expressed, rng.choice(silent, len(silent) // 2, replace=False)])  # half the silent: absent
    n_unknown = 40
    unknown = sp.csr_matrix(rng.poisson(2.0, size=(len(joinids), n_unknown)).astype(np.float32))
    perm = rng.permutation(len(cols) + n_unknown)
    X = sp.hstack([x[:, cols], unknown]).tocsr()[:, perm]
    var_names = np.concatenate([genes[cols], [f"NOTAGENE{i}" for i in range(n_unknown)]])[perm]
    annot = obs.loc[joinids, "cell_type"].astype(str).to_numpy()
    cell_names = [f"donor-cell-{i}" for i in rng.permutation(len(joinids))]
    adata = ad.AnnData(X=X, obs=pd.DataFrame({"annot": pd.Categorical(annot)}, index=cell_names))
    adata.var_names = var_names
    path = tmp_path_factory.mktemp("donor") / "donor.h5ad"
    adata.write_h5ad(path)
    return path, joinids, annot, (len(cols), n_unknown)


def test_eval_h5ad_embeds_every_cell_like_the_atlas(trained, donor_file, tmp_path, capsys):
    import anndata as ad

    from scfm_platform.checkpoint import load_model_for_inference
    from scfm_platform.data import batches
    from scfm_platform.eval.embed import embed_cells, read_zarr

    atlas, ckpt, _, uri = trained
    path, joinids, annot, (n_matched, n_unknown) = donor_file
    out = tmp_path / "donor"
    argv = ["eval", str(ckpt), "--data", str(path), "--label", "annot", "--out", str(out), "--tracking-uri", uri]
    assert _launch(argv) == 0
    printed = capsys.readouterr().out
    assert f"{n_matched} of the file's {n_matched + n_unknown} genes match" in printed
    assert f"{n_unknown} dropped" in printed and "knn_accuracy" in printed

    ids, X, attrs = read_zarr(out / "embeddings.zarr")
    assert np.array_equal(ids, np.arange(len(joinids))) and X.shape == (len(joinids), 64)  # soma_joinid = file row
    assert attrs["label"] == "annot"
    src = ad.read_h5ad(path)
    copy = ad.read_h5ad(out / "embeddings.h5ad")
    assert list(copy.obs_names) == list(src.obs_names) and copy.n_vars == src.n_vars
    np.testing.assert_array_equal(copy.obsm["X_scfm"], X)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["n_cells"] == len(joinids) and 0.0 <= scores["knn_accuracy"] <= 1.0
    assert scores["n_labels"] == len(set(annot))
    assert not [p for p in out.iterdir() if p.name.startswith(".atlas-")]  # the temporary atlas is gone

    # the same cells through the atlas path: equal embeddings prove the vocabulary and medians line up
    from dataclasses import replace

    model, cfg, _ = load_model_for_inference(ckpt)
    data_cfg = replace(cfg.data, atlas=atlas, tokens=None, engine="local")
    all_ids, all_X = embed_cells(model, batches(data_cfg, rank=0, world_size=1, epoch=0, split="all"))
    np.testing.assert_allclose(X, all_X[np.searchsorted(all_ids, joinids)], rtol=1e-4, atol=1e-5)


def test_eval_h5ad_errors_are_one_line(trained, donor_file, tmp_path, capsys):
    atlas, ckpt, _, _ = trained
    path = str(donor_file[0])
    cases = [
        (["--label", "cell_type"], "no obs column 'cell_type'; its obs columns: annot"),
        (["--label", "annot", "--atlas", "synthetic:100"], "trained on the synthetic stream"),
        (["--label", "annot", "--atlas", str(tmp_path / "gone")], "is missing or not an atlas; pass --atlas PATH"),
        (["--label", "annot", "--datasets", "donor"], "--datasets picks datasets of an atlas"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert _launch(["eval", str(ckpt), "--data", path, "--out", str(tmp_path / "x"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert _launch(["eval", str(ckpt), "--data", atlas, "--out", str(tmp_path / "y"), "--use-raw"]) == 2
    assert "apply to an .h5ad --data only" in capsys.readouterr().err
