"""The `launch eval` pipeline: cell embeddings → zarr + h5ad, scores, UMAP PNG, MLflow; and the in-training hook.

    evaluate_checkpoint(ckpt, data)   load the model, embed every cell of the atlas (or of an .h5ad file, on the
                                      training atlas's vocabulary), then evaluate_embeddings
    evaluate_embeddings(ids, X, obs)  files, scores (metrics.score_adata), UMAP (plots.plot_umap), MLflow (runs)
    training_scores(model, batches, labels)   scores only, for evaluation every N steps during training

Output directory layout: embeddings.zarr, embeddings.h5ad, umap.png, scores.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scfm_platform.errors import RunError
from scfm_platform.eval import metrics, plots, runs
from scfm_platform.eval.embed import embed_cells, write_h5ad, write_zarr

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from rich.table import Table

# What each score means, for the printed table.
DESCRIPTIONS = {
    "asw_label": "label silhouette, rescaled (asw+1)/2",
    "asw_label_raw": "label silhouette in [-1, 1]",
    "graph_connectivity": "label cohesion in the kNN graph",
    "isolated_label_asw": "silhouette of labels in fewest batches",
    "knn_accuracy": "kNN classifier, stratified 5-fold CV",
    "leiden_nmi": "NMI, Leiden at the best resolution",
    "leiden_ari": "ARI, Leiden at the best resolution",
    "leiden_resolution": "that resolution (max NMI)",
    "n_cells": "cells scored",
    "n_labels": "distinct labels",
}


@dataclass
class EvalResult:
    """Scores and the files and MLflow run an evaluation produced."""

    scores: dict[str, float]
    out_dir: Path
    zarr: Path
    h5ad: Path
    umap_png: Path
    run_id: str | None


def scores_table(scores: Mapping[str, float], *, title: str = "cell-type separation and cohesion") -> Table:
    """rich Table of scores: name, value, what it measures."""
    from rich.table import Table

    table = Table(title=title, header_style="bold")
    table.add_column("score", style="cyan", no_wrap=True)
    table.add_column("value", justify="right")
    table.add_column("meaning", style="dim")
    for key, value in scores.items():
        shown = f"{value:.0f}" if key.startswith("n_") else f"{value:.4f}"
        table.add_row(key, shown, DESCRIPTIONS.get(key, ""))
    return table


def evaluate_embeddings(
    joinids: np.ndarray,
    X: np.ndarray,
    obs: pd.DataFrame,
    *,
    out_dir: str | Path,
    label: str = "cell_type",
    batch_key: str | None = "dataset_id",
    source_h5ad: str | Path | None = None,
    seed: int = 0,
    resolutions: Sequence[float] = metrics.DEFAULT_RESOLUTIONS,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    experiment: str = "scfm",
    tags: Mapping[str, str] | None = None,
    log: bool = True,
    step: int = 0,
) -> EvalResult:
    """Write X [N, D] (cells `joinids` [N]) to zarr and h5ad, score it against obs[label], plot, log to MLflow.

    `obs` is indexed by soma_joinid and holds `label` (and `batch_key`, used for isolated labels when present).
    Scores go to MLflow run `run_id` (as eval/<score>, with scores.json and umap.png as artifacts), or to a new run
    in `experiment` tagged with `tags` when `run_id` is None; `log=False` skips MLflow. `step`: the training step
    the scores belong to (a checkpoint's step), so they sit beside the in-training eval/<score> points.
    """
    if label not in obs.columns:
        raise RunError(f"label column {label!r} is not in the cell metadata; columns: {sorted(obs.columns)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    aligned = obs.reindex(joinids)
    if aligned[label].isna().all():
        raise RunError(f"no embedded cell has a {label!r} value: the metadata does not cover these soma_joinids")
    attrs = {"label": label, "n_cells": len(joinids), **dict(tags or {})}
    zarr_path = write_zarr(out / "embeddings.zarr", joinids, X, attrs=attrs)
    h5ad_path = write_h5ad(out / "embeddings.h5ad", joinids, X, aligned, source=source_h5ad)

    batch = aligned[batch_key].to_numpy() if batch_key and batch_key in aligned.columns else None
    adata = metrics.embedding_adata(X, aligned[label].to_numpy(), batch=batch)
    metrics.neighbors(adata, seed=seed)
    scores = metrics.score_adata(adata, seed=seed, resolutions=resolutions)
    umap_png = plots.plot_umap(adata, out / "umap.png", title=f"{adata.n_obs} cells by {label}", seed=seed)
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")

    logged = None
    if log:
        c = runs.client(tracking_uri)
        logged = runs.log_scores(
            c,
            scores,
            run_id=run_id,
            experiment=experiment,
            tags=tags,
            artifacts=[out / "scores.json", umap_png],
            step=step,
        )
    return EvalResult(scores, out, zarr_path, h5ad_path, umap_png, logged)


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str,
    *,
    out_dir: str | Path,
    label: str = "cell_type",
    tracking_uri: str | None = None,
    seed: int = 0,
    datasets: Sequence[str] | None = None,
    atlas: str | None = None,
    use_raw: bool = False,
    print_fn: Callable[[str], Any] = print,
) -> EvalResult:
    """Embed every cell of `data` (an atlas, or an .h5ad file) with the checkpoint's model, then
    `evaluate_embeddings`; with `datasets`, only the cells of those datasets (obs `dataset_id`) of an atlas.

    `checkpoint`: a checkpoint directory, or a run directory (its newest checkpoint). Scores go to the MLflow run
    that trained the checkpoint, at `tracking_uri`, else the URI it trained with; when that was the local server
    `launch run` starts (and stopped), the same store is served again from `tracking.local_dir` for the logging.

    An .h5ad file is tokenized on the training atlas's gene vocabulary and gene medians: `atlas`, else the run's
    `data.atlas`. Its genes are matched by stable id, the others dropped (one line printed through `print_fn`
    says how many); its counts come from `.X` (or `.raw.X` with `use_raw`). The cells go into a temporary atlas
    (`scfm_data_service.build_aligned_atlas`) in a hidden folder of `out_dir` that is removed afterwards;
    soma_joinid = the file's row, and embeddings.h5ad is a copy of the file with obsm["X_scfm"].
    """
    import tempfile

    from scfm_data_service import build_aligned_atlas
    from scfm_platform.checkpoint import load_model_for_inference
    from scfm_platform.inference import find_checkpoint

    ckpt = find_checkpoint(checkpoint)
    print_fn(f"checkpoint {ckpt} (step {_checkpoint_step(ckpt)}): loading the model")
    is_file = str(data).endswith(".h5ad")
    if not is_file and (atlas or use_raw):
        raise RunError(f"--atlas and --use-raw apply to an .h5ad --data only; {data} is an atlas")
    if is_file and datasets:
        raise RunError(f"--datasets picks datasets of an atlas; {data} is one file: all its cells are evaluated")
    model, cfg, source_run = load_model_for_inference(ckpt)
    if not is_file:
        return _evaluate_atlas(
            model, cfg, ckpt, source_run, str(data), datasets, out_dir, label, tracking_uri, seed, source=None,
            print_fn=print_fn,
        )  # fmt: skip
    reference = _training_atlas(ckpt, cfg, atlas)
    _check_vocab(reference, cfg, model, ckpt)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".atlas-", dir=out) as tmp:
        aligned = build_aligned_atlas(
            str(Path(tmp) / "atlas"), data, reference=reference, use_raw=use_raw, obs_columns=[label]
        )
        print_fn(f"{data}: {aligned.summary()}")
        return _evaluate_atlas(
            model, cfg, ckpt, source_run, aligned.uri, None, out, label, tracking_uri, seed, source=str(data),
            print_fn=print_fn,
        )  # fmt: skip


def _training_atlas(ckpt: Path, cfg: Any, given: str | None) -> str:
    """The atlas whose vocabulary and medians the checkpoint's model was trained on: `given`, else data.atlas."""
    from scfm_data_service import DataError
    from scfm_data_service.atlas import read_meta
    from scfm_platform.data import SYNTHETIC

    uri = given or str(cfg.data.atlas)
    if uri.startswith(SYNTHETIC):
        raise RunError(
            f"{ckpt} was trained on the synthetic stream (data.atlas={uri}), which has no gene vocabulary to "
            "tokenize an .h5ad file with; pass --atlas ATLAS (the atlas a run trained on) or evaluate a checkpoint "
            "trained on an atlas"
        )
    try:
        read_meta(uri)
    except DataError:
        where = "--atlas" if given else f"the run's data.atlas in {ckpt}/run.json"
        raise RunError(
            f"training atlas {uri} (from {where}) is missing or not an atlas; pass --atlas PATH to the atlas the "
            "checkpoint was trained on: its gene vocabulary and medians tokenize the .h5ad file"
        ) from None
    return uri


def _check_vocab(uri: str, cfg: Any, model: Any, ckpt: Path) -> None:
    """RunError unless atlas `uri` gives the model's vocabulary size."""
    from dataclasses import replace

    from scfm_platform.data import vocab_size

    n_vocab = vocab_size(replace(cfg.data, atlas=uri, tokens=None, engine="local"))
    if n_vocab != model.dims.vocab_size:
        raise RunError(
            f"{uri}: its gene vocabulary gives {n_vocab} tokens but {ckpt} was trained with {model.dims.vocab_size}; "
            "evaluate on an atlas with the training atlas's genes"
        )


def _evaluate_atlas(
    model: Any,
    cfg: Any,
    ckpt: Path,
    source_run: str | None,
    data: str,
    datasets: Sequence[str] | None,
    out_dir: str | Path,
    label: str,
    tracking_uri: str | None,
    seed: int,
    *,
    source: str | None,
    print_fn: Callable[[str], Any] = print,
) -> EvalResult:
    """evaluate_checkpoint on atlas `data` once the model is loaded (`source`: the .h5ad the atlas was built from)."""
    import time
    from dataclasses import replace

    from scfm_data_service import read_obs
    from scfm_platform.data import batches as data_batches
    from scfm_platform.inference import read_run_info

    data_cfg = replace(cfg.data, atlas=str(data), tokens=None, engine="local")
    _check_vocab(data, cfg, model, ckpt)
    obs = read_obs(data, [label, "dataset_id"] if label != "dataset_id" else [label])
    keep = dataset_cells(obs, datasets, data)
    batches = data_batches(data_cfg, rank=0, world_size=1, epoch=0, split="all", only=keep)
    if keep is not None:
        obs = obs.loc[keep]
    t0 = time.monotonic()
    joinids, X = embed_cells(model, batches)
    print_fn(f"embedded {len(joinids)} cells in {time.monotonic() - t0:.0f} s; scoring them and drawing the UMAP")
    tags = {runs.CHECKPOINT_TAG: str(ckpt), "scfm.eval_data": source or str(data)}
    if source_run:
        tags[runs.SOURCE_RUN_TAG] = source_run
    with _tracking(tracking_uri, read_run_info(ckpt).get("tracking_uri"), cfg) as uri:
        return evaluate_embeddings(
            joinids,
            X,
            obs,
            out_dir=out_dir,
            label=label,
            source_h5ad=source,
            seed=seed,
            tracking_uri=uri,
            run_id=_existing_run(uri, source_run),
            experiment=cfg.tracking.experiment,
            tags=tags,
            step=_checkpoint_step(ckpt),
        )


def _checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint was saved at (its train_state.json), 0 if unknown."""
    from scfm_platform.inference import STATE_FILE

    try:
        return int(json.loads((Path(ckpt) / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def dataset_cells(obs: pd.DataFrame, datasets: Sequence[str] | None, data: str) -> np.ndarray | None:
    """soma_joinids int64 [N] of the cells in `datasets`, or None for all; unknown names are an error listing the
    known ones."""
    if not datasets:
        return None
    known = sorted(obs["dataset_id"].astype(str).unique())
    unknown = [d for d in datasets if d not in known]
    if unknown:
        raise RunError(f"{data}: no dataset {', '.join(map(repr, unknown))}; its datasets: {', '.join(known)}")
    ids = obs.index[obs["dataset_id"].astype(str).isin(list(datasets))].to_numpy()
    return np.sort(ids).astype(np.int64)


def _existing_run(uri: str | None, run_id: str | None) -> str | None:
    """`run_id` if the store at `uri` has it; else None: the scores go to a new run tagged with the source run."""
    if run_id is None:
        return None
    from mlflow.exceptions import MlflowException

    try:
        runs.client(uri).get_run(run_id)
    except MlflowException:
        return None
    return run_id


@contextmanager
def _tracking(given: str | None, recorded: str | None, cfg: Any) -> Iterator[str | None]:
    """The tracking URI to log to: `given`, else the one the run recorded (serving the local store again if it was
    `launch run`'s own server and it is gone), else `runs.resolve_tracking_uri()`'s default (None)."""
    if given:
        yield given
        return
    uri = recorded or cfg.tracking.uri
    if uri and uri.startswith("http") and cfg.tracking.uri is None:
        from scfm_platform.tracking import LocalServer, healthy

        if not healthy(uri):
            server = LocalServer(cfg.tracking.local_dir, cfg.tracking.local_port)
            try:
                yield server.start()
            finally:
                server.stop()
            return
    yield uri


def training_scores(
    model: Any,
    batches: Iterable[Mapping[str, torch.Tensor]],
    labels: pd.Series,
    *,
    seed: int = 0,
    resolutions: Sequence[float] = (0.25, 0.5, 1.0),
    max_cells: int = 5000,
) -> dict[str, float]:
    """Scores of the model's embedding of a held-out labelled set, for the trainer to log every N steps.

    `labels` is indexed by soma_joinid. At most `max_cells` cells (seeded subset) are scored, with a short Leiden
    sweep, so one call costs seconds, not minutes. No files, no MLflow: the trainer logs the returned dict with
    its step (as eval/<score>, like `launch eval`).
    """
    joinids, X = embed_cells(model, batches)
    lab = labels.reindex(joinids).to_numpy()
    if len(joinids) > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(len(joinids), size=max_cells, replace=False))
        X, lab = X[keep], lab[keep]
    return metrics.score_embeddings(X, lab, seed=seed, resolutions=resolutions)
