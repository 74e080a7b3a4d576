"""Scores on synthetic embeddings: separated clusters score high, shuffled labels low (real scanpy/sklearn)."""

from __future__ import annotations

import numpy as np
import pytest

from scfm_platform.eval.metrics import (
    SCORE_KEYS,
    embedding_adata,
    graph_connectivity,
    isolated_label_asw,
    isolated_labels,
    neighbors,
    score_embeddings,
)

N, K, D = 300, 5, 16
RESOLUTIONS = (0.2, 0.5, 1.0)  # a short sweep keeps the test fast; the default is scib's 0.1..2.0


def _blobs(spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"type{i}" for i in range(K)], N // K)
    centers = rng.normal(size=(K, D)) * spread
    return centers[np.searchsorted(np.unique(labels), labels)] + rng.normal(size=(N, D)), labels


@pytest.fixture(scope="module")
def scores() -> dict[str, dict[str, float]]:
    X, labels = _blobs(spread=6.0)
    shuffled = np.random.default_rng(1).permutation(labels)
    Xw, _ = _blobs(spread=0.8)  # weakly separated
    return {
        "separated": score_embeddings(X, labels, resolutions=RESOLUTIONS),
        "weak": score_embeddings(Xw, labels, resolutions=RESOLUTIONS),
        "shuffled": score_embeddings(X, shuffled, resolutions=RESOLUTIONS),
    }


def test_keys_and_ranges(scores) -> None:
    for s in scores.values():
        assert set(s) == set(SCORE_KEYS)
        assert -1 <= s["asw_label_raw"] <= 1
        assert s["asw_label"] == pytest.approx((s["asw_label_raw"] + 1) / 2)
        for k in ("asw_label", "graph_connectivity", "isolated_label_asw", "knn_accuracy", "leiden_nmi"):
            assert 0 <= s[k] <= 1, k
        assert -1 <= s["leiden_ari"] <= 1
        assert s["leiden_resolution"] in RESOLUTIONS
        assert (s["n_cells"], s["n_labels"]) == (N, K)


def test_separated_clusters_score_high(scores) -> None:
    s = scores["separated"]
    assert s["asw_label_raw"] > 0.5
    assert s["graph_connectivity"] > 0.95
    assert s["knn_accuracy"] > 0.95
    assert s["leiden_nmi"] > 0.9 and s["leiden_ari"] > 0.9
    assert s["isolated_label_asw"] > 0.75


def test_shuffled_labels_score_low(scores) -> None:
    s = scores["shuffled"]
    assert abs(s["asw_label_raw"]) < 0.1
    assert s["graph_connectivity"] < 0.6
    assert s["knn_accuracy"] < 0.4  # chance is 1/K = 0.2
    assert s["leiden_nmi"] < 0.15 and s["leiden_ari"] < 0.1


def test_scores_order_separated_weak_shuffled(scores) -> None:
    for k in ("asw_label", "isolated_label_asw", "knn_accuracy", "leiden_nmi", "leiden_ari"):
        assert scores["separated"][k] > scores["weak"][k] > scores["shuffled"][k], k
    assert scores["separated"]["graph_connectivity"] >= scores["weak"]["graph_connectivity"]
    assert scores["weak"]["graph_connectivity"] > scores["shuffled"]["graph_connectivity"]


def test_graph_connectivity_sees_a_label_split_in_two() -> None:
    """A label whose cells form two far-apart groups is half-connected; merging its groups restores 1."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=(60, 8)) + off for off in (0.0, 50.0, 100.0))
    X = np.vstack([a, b, c])
    split = np.array(["x"] * 60 + ["y"] * 60 + ["x"] * 60)  # "x" lives in two distant groups
    adata = embedding_adata(X, split)
    neighbors(adata, n_neighbors=10)
    per_x = graph_connectivity(adata.obsp["connectivities"], np.array(["x"] * 180))
    assert per_x == pytest.approx(1 / 3, abs=0.02)  # one graph, three components
    gc = graph_connectivity(adata.obsp["connectivities"], split)
    assert gc == pytest.approx((0.5 + 1.0) / 2, abs=0.02)


def test_isolated_labels_use_batches() -> None:
    X, labels = _blobs(spread=6.0)
    batch = np.where(np.arange(N) % 2 == 0, "d1", "d2")
    batch[labels == "type3"] = "d1"  # type3 is only in one dataset: the isolated label
    assert isolated_labels(labels, batch) == ["type3"]
    assert isolated_labels(labels, np.array(["one"] * N)) == sorted(set(labels))
    good = isolated_label_asw(X, labels, batch)
    # scatter type3's cells over all the other types: it no longer stands apart (one-vs-rest silhouette ~ 0)
    mixed = X.copy()
    others = np.flatnonzero(labels != "type3")
    mixed[labels == "type3"] = X[np.random.default_rng(2).choice(others, (labels == "type3").sum())] + 0.01
    assert good > 0.75 and isolated_label_asw(mixed, labels, batch) < 0.6


def test_missing_labels_dropped_and_input_errors() -> None:
    X, labels = _blobs(spread=6.0)
    lab = labels.astype(object)
    lab[:7] = None
    adata = embedding_adata(X, lab)
    assert adata.n_obs == N - 7 and adata.obsm["X_scfm"].shape == (N - 7, D)
    with pytest.raises(ValueError, match=r"at least two cell-type labels"):
        score_embeddings(X, ["same"] * N, resolutions=RESOLUTIONS)
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \[300\]; got \[299\]"):
        score_embeddings(X, labels[:-1])
    with pytest.raises(ValueError, match=r"\[N, D\]; got shape \(300,\)"):
        score_embeddings(X[:, 0], labels)


def test_rare_labels_do_not_break_knn_accuracy() -> None:
    X, labels = _blobs(spread=6.0)
    labels = labels.copy()
    labels[:3] = "rare"  # fewer cells than folds: left out of kNN accuracy only
    s = score_embeddings(X, labels, resolutions=RESOLUTIONS)
    assert s["n_labels"] == K + 1 and s["knn_accuracy"] > 0.9
