"""Cell-type separation and cohesion scores of a cell embedding, computed with scanpy and scikit-learn.

Shapes: N cells, D embedding dims. Every score is "higher is better"; `score_embeddings` returns:

    asw_label_raw       mean silhouette of cell-type labels, in [-1, 1]    (sklearn.metrics.silhouette_score)
    asw_label           the same rescaled to [0, 1]: (asw_raw + 1) / 2      (scib's "ASW label")
    graph_connectivity  mean over labels of the fraction of the label's cells in the largest connected component
                        of the kNN graph restricted to that label, in [0, 1] (scanpy neighbors +
                        scipy.sparse.csgraph.connected_components; scib's definition)
    isolated_label_asw  ASW variant of scib's isolated-label score, in [0, 1]: labels present in the fewest batches
                        are "isolated"; for each, the one-vs-rest silhouette (label vs all other cells) averaged over
                        the label's cells, rescaled (s + 1) / 2; mean over isolated labels. Without `batch` every
                        label sits in the one batch, so every label counts as isolated.
    knn_accuracy        mean accuracy of a kNN classifier (sklearn KNeighborsClassifier) under stratified 5-fold CV;
                        labels with fewer cells than folds are left out of this score only
    leiden_nmi / _ari   NMI / ARI (sklearn.metrics) between labels and Leiden clusters (scanpy.tl.leiden, igraph
                        flavour) at the resolution, from a sweep of 0.1..2.0, that maximises NMI (as scib does)
    leiden_resolution   that resolution; n_cells, n_labels: what was scored

cLISI is not computed: the maintained implementation (scib-metrics) pulls in jax, and re-implementing it by hand is
not wanted; graph connectivity is the kNN-graph cohesion score instead.
Silhouette scores cost O(N²): above `max_asw_cells` cells they are computed on a seeded random subset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

EMBED_KEY = "X_scfm"  # obsm key of the cell embedding
DEFAULT_RESOLUTIONS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 21))  # scib's sweep
SCORE_KEYS = (
    "asw_label",
    "asw_label_raw",
    "graph_connectivity",
    "isolated_label_asw",
    "knn_accuracy",
    "leiden_nmi",
    "leiden_ari",
    "leiden_resolution",
    "n_cells",
    "n_labels",
)


def score_embeddings(
    X: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    *,
    batch: Sequence[Any] | np.ndarray | None = None,
    seed: int = 0,
    n_neighbors: int = 15,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    folds: int = 5,
    max_asw_cells: int = 20_000,
) -> dict[str, float]:
    """Scores of embedding X [N, D] against `labels` [N] (and `batch` [N] for isolated labels); see module doc.

    Cells whose label is missing (NaN/None) are dropped. Needs at least two labels.
    """
    adata = embedding_adata(X, labels, batch=batch)
    neighbors(adata, n_neighbors=n_neighbors, seed=seed)
    return score_adata(adata, seed=seed, resolutions=resolutions, folds=folds, max_asw_cells=max_asw_cells)


def embedding_adata(
    X: np.ndarray, labels: Sequence[Any] | np.ndarray, *, batch: Sequence[Any] | np.ndarray | None = None
) -> AnnData:
    """AnnData of N cells: obsm[EMBED_KEY] = X [N, D], obs["label"], obs["batch"]; unlabelled cells dropped."""
    import anndata as ad
    import pandas as pd

    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"embedding must be [N, D]; got shape {X.shape}")
    lab = pd.Series(np.asarray(labels, dtype=object))
    if len(lab) != len(X):
        raise ValueError(f"labels must be [N] = [{len(X)}]; got [{len(lab)}]")
    bat = pd.Series(np.asarray(batch, dtype=object)) if batch is not None else pd.Series(["all"] * len(X))
    if len(bat) != len(X):
        raise ValueError(f"batch must be [N] = [{len(X)}]; got [{len(bat)}]")
    keep = lab.notna().to_numpy()
    obs = pd.DataFrame(
        {"label": lab[keep].astype(str).to_numpy(), "batch": bat[keep].astype(str).to_numpy()},
        index=[str(i) for i in np.flatnonzero(keep)],
    )
    obs["label"] = obs["label"].astype("category")
    obs["batch"] = obs["batch"].astype("category")
    adata = ad.AnnData(obs=obs)
    adata.obsm[EMBED_KEY] = X[keep]
    return adata


def neighbors(adata: AnnData, *, n_neighbors: int = 15, seed: int = 0) -> None:
    """kNN graph of obsm[EMBED_KEY] in place (scanpy.pp.neighbors): obsp["connectivities"], obsp["distances"]."""
    import scanpy as sc

    k = max(2, min(n_neighbors, adata.n_obs - 1))
    sc.pp.neighbors(adata, n_neighbors=k, use_rep=EMBED_KEY, random_state=seed)


def score_adata(
    adata: AnnData,
    *,
    seed: int = 0,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    folds: int = 5,
    max_asw_cells: int = 20_000,
) -> dict[str, float]:
    """All scores of an `embedding_adata` whose kNN graph `neighbors` has built; see module doc."""
    labels = adata.obs["label"].to_numpy().astype(str)
    n_labels = len(np.unique(labels))
    if n_labels < 2:
        raise ValueError(f"scoring needs at least two cell-type labels; got {n_labels} in {adata.n_obs} cells")
    X = adata.obsm[EMBED_KEY]
    batch = adata.obs["batch"].to_numpy().astype(str)
    asw = label_asw(X, labels, seed=seed, max_cells=max_asw_cells)
    nmi, ari, res = leiden_nmi_ari(adata, labels, resolutions=resolutions, seed=seed)
    return {
        "asw_label": (asw + 1.0) / 2.0,
        "asw_label_raw": asw,
        "graph_connectivity": graph_connectivity(adata.obsp["connectivities"], labels),
        "isolated_label_asw": isolated_label_asw(X, labels, batch, seed=seed, max_cells=max_asw_cells),
        "knn_accuracy": knn_accuracy(X, labels, folds=folds, seed=seed),
        "leiden_nmi": nmi,
        "leiden_ari": ari,
        "leiden_resolution": res,
        "n_cells": float(adata.n_obs),
        "n_labels": float(n_labels),
    }


def _subset(n: int, max_cells: int, seed: int) -> np.ndarray:
    if n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))


def label_asw(X: np.ndarray, labels: np.ndarray, *, seed: int = 0, max_cells: int = 20_000) -> float:
    """Silhouette of `labels` [N] in X [N, D], in [-1, 1] (sklearn, euclidean)."""
    from sklearn.metrics import silhouette_score

    idx = _subset(len(X), max_cells, seed)
    if len(np.unique(labels[idx])) < 2:
        return float("nan")
    return float(silhouette_score(X[idx], labels[idx], metric="euclidean"))


def graph_connectivity(connectivities: Any, labels: np.ndarray) -> float:
    """Mean over labels of |largest connected component| / |label| in the kNN graph [N, N] cut to each label."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    graph = csr_matrix(connectivities)
    fractions = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        _, comp = connected_components(graph[idx][:, idx], connection="strong")
        fractions.append(np.bincount(comp).max() / len(idx))
    return float(np.mean(fractions))


def isolated_labels(labels: np.ndarray, batch: np.ndarray) -> list[str]:
    """Labels present in the fewest batches (scib's isolated labels); all labels when there is one batch."""
    import pandas as pd

    per_label = pd.DataFrame({"label": labels, "batch": batch}).groupby("label", observed=True)["batch"].nunique()
    return sorted(per_label.index[per_label == per_label.min()].astype(str))


def isolated_label_asw(
    X: np.ndarray, labels: np.ndarray, batch: np.ndarray, *, seed: int = 0, max_cells: int = 20_000
) -> float:
    """Mean over isolated labels of the rescaled one-vs-rest silhouette of the label's cells, in [0, 1]."""
    from sklearn.metrics import silhouette_samples

    idx = _subset(len(X), max_cells, seed)
    X, labels, batch = X[idx], labels[idx], batch[idx]
    scores = []
    for label in isolated_labels(labels, batch):
        group = labels == label
        if group.all() or not group.any():
            continue
        s = silhouette_samples(X, group.astype(int), metric="euclidean")[group].mean()
        scores.append((s + 1.0) / 2.0)
    return float(np.mean(scores)) if scores else float("nan")


def knn_accuracy(X: np.ndarray, labels: np.ndarray, *, folds: int = 5, k: int = 15, seed: int = 0) -> float:
    """Mean accuracy of a k-nearest-neighbour classifier under stratified `folds`-fold CV (sklearn)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    values, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, values[counts >= folds])
    if len(np.unique(labels[keep])) < 2:
        return float("nan")
    X, y = X[keep], labels[keep]
    k = min(k, len(y) - len(y) // folds - 1)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(KNeighborsClassifier(n_neighbors=k), X, y, cv=cv, scoring="accuracy").mean())


def leiden_nmi_ari(
    adata: AnnData, labels: np.ndarray, *, resolutions: Sequence[float] = DEFAULT_RESOLUTIONS, seed: int = 0
) -> tuple[float, float, float]:
    """(NMI, ARI, resolution) of Leiden clusters of the kNN graph vs `labels`, at the NMI-maximising resolution."""
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    best = (-1.0, float("nan"), float("nan"))
    for res in resolutions:
        sc.tl.leiden(
            adata,
            resolution=res,
            flavor="igraph",
            n_iterations=2,
            directed=False,
            random_state=seed,
            key_added="_leiden",
        )
        clusters = adata.obs["_leiden"].to_numpy()
        nmi = normalized_mutual_info_score(labels, clusters)
        if nmi > best[0]:
            best = (nmi, adjusted_rand_score(labels, clusters), float(res))
    del adata.obs["_leiden"]
    return float(best[0]), float(best[1]), best[2]
