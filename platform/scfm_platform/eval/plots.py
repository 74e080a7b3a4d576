"""Figures: a UMAP of cell embeddings coloured by label, and training curves of several runs overlaid.

matplotlib runs on the Agg backend (no display needed); every function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

# metric -> (axis title, log y-axis)
CURVES: dict[str, tuple[str, bool]] = {
    "loss": ("training loss", False),
    "val_loss": ("validation loss", False),
    "grad_norm": ("gradient norm (before clipping)", True),
}

History = tuple[Sequence[float], Sequence[float]]  # (steps [S], values [S])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_umap(adata: AnnData, path: str | Path, *, color: str = "label", title: str = "", seed: int = 0) -> Path:
    """UMAP (scanpy.tl.umap on the kNN graph already in `adata`) of N cells, coloured by obs[color]; writes PNG."""
    import scanpy as sc

    if "neighbors" not in adata.uns:
        raise ValueError("plot_umap needs the kNN graph: call scfm_platform.eval.metrics.neighbors(adata) first")
    if "X_umap" not in adata.obsm:
        sc.tl.umap(adata, random_state=seed)
    xy = adata.obsm["X_umap"]
    groups = adata.obs[color].astype(str).to_numpy()
    names = sorted(np.unique(groups))
    plt = _pyplot()
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(7.5, 6), dpi=120)
    size = max(1.0, min(20.0, 12000 / max(len(xy), 1)))
    order = np.random.default_rng(seed).permutation(len(xy))  # no label drawn entirely on top of the others
    colors = {name: cmap(i % cmap.N) for i, name in enumerate(names)}
    ax.scatter(xy[order, 0], xy[order, 1], c=[colors[g] for g in groups[order]], s=size, linewidths=0, rasterized=True)
    for name in names:
        ax.scatter([], [], color=colors[name], label=name, s=20)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=7, markerscale=1.2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title or f"{len(xy)} cells coloured by {color}", fontsize=10)
    return _save(fig, path)


def plot_curves(
    histories: Mapping[str, Mapping[str, History]],
    path: str | Path,
    *,
    metrics: Sequence[str] = ("loss", "val_loss", "grad_norm"),
    title: str = "",
) -> Path:
    """One panel per metric, one line per run: `histories[run_label][metric] = (steps, values)`; writes PNG.

    Metrics no run logged are left out; a run missing a metric is simply absent from that panel.
    """
    shown = [m for m in metrics if any(len(h.get(m, ((), ()))[0]) for h in histories.values())]
    if not shown:
        raise ValueError(f"none of the runs logged any of the metrics {list(metrics)}")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown), 4), dpi=110, squeeze=False)
    for ax, metric in zip(axes[0], shown):
        label, log = CURVES.get(metric, (metric, False))
        for run, hist in histories.items():
            steps, values = hist.get(metric, ((), ()))
            if len(steps):
                ax.plot(steps, values, label=run, linewidth=1.3, marker="o" if len(steps) < 20 else None, ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path
