"""`launch eval` on a real checkpoint: a tiny 1-worker DeepSpeed ZeRO-2 Ray Train run on a small demo atlas (the
session-scoped `trained` fixture of conftest.py, shared with test_eval_h5ad.py), then eval embeds every cell, writes
zarr + h5ad + UMAP PNG, prints the scores table and logs them to the training run.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from scfm_platform.errors import RunError


def _launch(argv: list[str]) -> int:
    """`launch eval ...` through the CLI when it registers eval, else through the command module's own parser."""
    from scfm_launch import cli
    from scfm_launch.commands import eval as eval_cmd

    if "eval" in cli.COMMANDS:
        return cli.main(argv)
    parser = argparse.ArgumentParser(prog="launch")
    eval_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def test_checkpoint_holds_run_config(trained):
    _, ckpt, res, uri = trained
    info = json.loads((ckpt / "run.json").read_text())
    assert info["run_id"] == res.mlflow_run_id and info["tracking_uri"] == uri
    assert info["config"]["model"]["preset"] == "tiny" and info["vocab_size"] > 3


def test_in_training_eval_scores_the_named_datasets(trained):
    """eval.every + eval.datasets: rank 0 embeds and scores every PBMC cell at step 4, logged as eval/<score>."""
    from mlflow import MlflowClient

    _, _, res, uri = trained
    c = MlflowClient(tracking_uri=uri)
    first = sorted(c.get_metric_history(res.mlflow_run_id, "eval/n_cells"), key=lambda m: m.timestamp)[0]
    assert (first.step, first.value) == (4, 700.0)  # all 700 PBMC cells, none of the 300 synthetic ones
    asw = sorted(c.get_metric_history(res.mlflow_run_id, "eval/asw_label"), key=lambda m: m.timestamp)[0]
    assert asw.step == 4 and 0.0 <= asw.value <= 1.0


def test_launch_eval_end_to_end(trained, tmp_path, capsys):
    import anndata as ad
    import matplotlib.image as mpimg
    from mlflow import MlflowClient

    import scfm_data_service
    from scfm_platform.eval.embed import read_zarr

    atlas, ckpt, res, uri = trained
    out = tmp_path / "eval"
    # the run directory stands for its newest checkpoint
    assert _launch(["eval", str(ckpt.parent), "--data", atlas, "--label", "cell_type", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "asw_label" in printed and "knn_accuracy" in printed and res.mlflow_run_id in printed
    assert "(step 4): loading the model" in printed and "embedded 1000 cells" in printed  # stage lines

    obs = scfm_data_service.read_obs(atlas, ["cell_type"])  # every cell of the atlas (indexed by soma_joinid)
    assert len(obs) == 700 + 300
    joinids, X, attrs = read_zarr(out / "embeddings.zarr")
    assert X.shape == (len(obs), 64) and X.dtype == np.float32 and np.isfinite(X).all()
    assert np.array_equal(np.sort(joinids), np.sort(obs.index.to_numpy()))  # every cell exactly once
    assert len(np.unique(joinids)) == len(joinids) and attrs["label"] == "cell_type"
    a = ad.read_h5ad(out / "embeddings.h5ad")
    assert a.obsm["X_scfm"].shape == X.shape and np.array_equal(a.obs["soma_joinid"].to_numpy(), joinids)
    img = mpimg.imread(out / "umap.png")
    assert img.ndim == 3 and img.shape[0] > 100
    scores = json.loads((out / "scores.json").read_text())
    assert 0.0 <= scores["knn_accuracy"] <= 1.0

    run = MlflowClient(tracking_uri=uri).get_run(res.mlflow_run_id)  # the training run itself
    # logged at the checkpoint's step (4), after the in-training point of the same step: the latest value
    assert run.data.metrics["eval/knn_accuracy"] == pytest.approx(scores["knn_accuracy"])
    assert run.data.tags["scfm.checkpoint"] == str(ckpt)
    assert run.info.status == "FINISHED"


def test_launch_eval_one_dataset(trained, tmp_path, capsys):
    """--datasets: only the labelled PBMC cells are embedded and scored; an unknown name is one line, exit 2."""
    import scfm_data_service
    from scfm_platform.eval.embed import read_zarr

    atlas, ckpt, _, uri = trained
    out = tmp_path / "pbmc"
    argv = [
        "eval",
        str(ckpt),
        "--data",
        atlas,
        "--out",
        str(out),
        "--tracking-uri",
        uri,
        "--datasets",
        "pbmc68k_reduced",
    ]
    assert _launch(argv) == 0
    obs = scfm_data_service.read_obs(atlas, ["dataset_id"])
    pbmc = np.sort(obs.index[obs["dataset_id"] == "pbmc68k_reduced"].to_numpy())
    joinids, X, _ = read_zarr(out / "embeddings.zarr")
    assert len(pbmc) == 700 and np.array_equal(joinids, pbmc) and X.shape[0] == 700
    capsys.readouterr()
    assert _launch(["eval", str(ckpt), "--data", atlas, "--out", str(tmp_path / "x"), "--datasets", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no dataset 'nope'" in err and "pbmc68k_reduced" in err and "Traceback" not in err


def test_loads_strict_and_rejects_another_model_size(trained):
    from dataclasses import replace

    import torch

    from scfm_platform.checkpoint import load_model_for_inference

    _, ckpt, res, _ = trained
    model, cfg, run_id = load_model_for_inference(ckpt, device="cpu")
    assert run_id == res.mlflow_run_id and not model.training and cfg.model.preset == "tiny"
    ds = torch.load(next((ckpt / "ds").glob("mp_rank_*model_states.pt")), map_location="cpu", weights_only=False)
    for k, v in model.state_dict().items():  # the trained weights, not a fresh init
        assert torch.equal(v, ds["module"][k].float()), k

    small = replace(cfg, model=replace(cfg.model, preset="small"))
    with pytest.raises(RunError) as e:
        load_model_for_inference(ckpt, small)
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt) in msg and "model.preset=small" in msg and "dim 64" in msg

    with pytest.raises(RunError, match="not a checkpoint"):
        load_model_for_inference(ckpt / "ds")
