"""The eval pipeline after the model: embeddings → zarr + h5ad, scores, UMAP PNG, MLflow run.

Test input (not a model): PCA of the expression of scanpy's bundled PBMC sample (700 cells, `bulk_labels`), next to a
random embedding of the same cells. The real model path (`embed_cells`) is tested in tests/unit/test_eval_embed.py.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scfm_platform.errors import RunError
from scfm_platform.eval import runs
from scfm_platform.eval.evaluate import evaluate_embeddings, scores_table, training_scores

RES = (0.25, 0.5, 1.0)


@pytest.fixture(scope="module")
def pbmc():
    import scanpy as sc

    a = sc.datasets.pbmc68k_reduced()
    sc.pp.pca(a, n_comps=20, random_state=0)
    joinids = np.arange(a.n_obs, dtype=np.int64) * 2 + 100  # any ids; obs is looked up by them
    obs = pd.DataFrame(
        {"cell_type": a.obs["bulk_labels"].astype(str).to_numpy(), "dataset_id": "pbmc68k"}, index=joinids
    )
    return joinids, a.obsm["X_pca"].astype(np.float32), obs


def test_pca_stand_in_scores_files_and_mlflow(pbmc, tmp_path) -> None:
    import anndata as ad
    import matplotlib.image as mpimg
    from mlflow import MlflowClient

    from scfm_platform.eval.embed import read_zarr

    joinids, X, obs = pbmc
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("pbmc", artifact_location=str(tmp_path / "artifacts"))
    train_run = c.create_run(exp, run_name="train").info.run_id
    c.set_terminated(train_run)

    res = evaluate_embeddings(
        joinids, X, obs, out_dir=tmp_path / "eval", resolutions=RES, tracking_uri=uri, run_id=train_run
    )
    rand = evaluate_embeddings(
        joinids,
        np.random.default_rng(0).normal(size=X.shape).astype(np.float32),
        obs,
        out_dir=tmp_path / "eval_random",
        resolutions=RES,
        tracking_uri=uri,
        experiment="pbmc",
        tags={runs.CHECKPOINT_TAG: "/ckpt/random"},
    )
    # real structure beats noise on every separation score
    for k in ("asw_label", "graph_connectivity", "knn_accuracy", "leiden_nmi", "leiden_ari"):
        assert res.scores[k] > rand.scores[k], k
    assert res.scores["knn_accuracy"] > 0.6 and rand.scores["knn_accuracy"] < 0.45
    assert res.scores["n_cells"] == 700 and res.scores["n_labels"] == 10

    ids2, X2, attrs = read_zarr(res.zarr)
    assert (ids2 == joinids).all() and np.array_equal(X2, X) and attrs["label"] == "cell_type"
    h = ad.read_h5ad(res.h5ad)
    assert h.obsm["X_scfm"].shape == (700, 20) and list(h.obs["cell_type"]) == list(obs["cell_type"])
    img = mpimg.imread(res.umap_png)
    assert img.shape[0] > 400 and img[..., :3].std() > 0.05
    assert json.loads((res.out_dir / "scores.json").read_text()) == pytest.approx(res.scores)

    # scores went to the training run; the random one to a new run tagged with its checkpoint
    assert res.run_id == train_run
    logged = c.get_run(train_run)
    assert logged.data.metrics["eval/asw_label"] == pytest.approx(res.scores["asw_label"])
    assert logged.info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(train_run, "eval")} == {"eval/scores.json", "eval/umap.png"}
    new = c.get_run(rand.run_id)
    assert new.info.run_id != train_run and new.data.tags[runs.CHECKPOINT_TAG] == "/ckpt/random"
    assert new.data.metrics["eval/knn_accuracy"] == pytest.approx(rand.scores["knn_accuracy"])


def test_scores_table_and_label_errors(pbmc, tmp_path, monkeypatch) -> None:
    from rich.console import Console

    joinids, X, obs = pbmc
    with pytest.raises(RunError, match=r"label column 'celltype' is not in the cell metadata.*cell_type"):
        evaluate_embeddings(joinids, X, obs, out_dir=tmp_path, label="celltype", log=False)
    with pytest.raises(RunError, match="no embedded cell has a 'cell_type' value"):
        evaluate_embeddings(joinids + 1, X, obs, out_dir=tmp_path, log=False)
    console = Console(record=True, width=120)
    console.print(scores_table({"asw_label": 0.61234, "n_cells": 700.0}))
    text = console.export_text()
    assert "asw_label" in text and "0.6123" in text and "700" in text and "silhouette" in text


def test_training_scores_with_real_model() -> None:
    import torch

    from scfm_data_service import schema
    from scfm_platform.config import ModelConfig
    from scfm_platform.model import CellTransformer
    from scfm_platform.synthetic import synthetic_batch

    torch.manual_seed(0)
    model = CellTransformer(ModelConfig(preset="tiny"), vocab_size=203, max_len=16, n_bins=51, tokenizer="binned")
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(4):
        b = synthetic_batch(30, 16, 200, generator=g)
        b[schema.SOMA_JOINID] = torch.arange(30) + 30 * i
        batches.append(b)
    labels = pd.Series(np.repeat(["a", "b", "c"], 40), index=np.arange(120))
    s = training_scores(model, batches, labels, max_cells=90)
    assert s["n_cells"] == 90 and s["n_labels"] == 3
    assert all(np.isfinite(v) for v in s.values())
