"""Cell embeddings from a model over data-service batches, and where they are written (zarr v3, h5ad).

Shape key: B cells per batch, T tokens, N cells in all, D embedding dims.
`embed_cells(model, batches)` runs `model.cell_embedding(gene_ids, values, seq_lens) -> [B, D]` (the cell
transformer's CLS or mean pooling, `model.pooling`) on every batch, with the objective's masking undone: masked
positions get their true gene id and value back from `target_gene_ids` / `target_values`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scfm_data_service import schema
from scfm_platform.eval.metrics import EMBED_KEY

if TYPE_CHECKING:
    import pandas as pd
    import torch


def unmasked_inputs(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gene_ids [B, T], values [B, T], seq_lens [B]) with masked positions restored from the targets."""
    import torch

    gene_ids, values = batch[schema.GENE_IDS], batch[schema.VALUES]
    mask = batch.get(schema.MASK)
    if mask is not None and bool(mask.any()):
        gene_ids = torch.where(mask, batch[schema.TARGET_GENE_IDS], gene_ids)
        values = torch.where(mask, batch[schema.TARGET_VALUES].to(values.dtype), values)
    return gene_ids, values, batch[schema.SEQ_LENS]


def embed_cells(model: Any, batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """(soma_joinid int64 [N], X float32 [N, D]) for every cell of `batches`, sorted by soma_joinid.

    `model` is a bare module (not a DeepSpeed engine: pass `engine.module`) with `cell_embedding`. Runs in eval mode
    under inference_mode on the model's device; the model's train/eval mode is restored afterwards. A cell delivered
    twice is an error (the data service delivers each cell exactly once per epoch). An autocast context around the
    call holds for the forward (the trainer's under `train.precision=amp`: `scfm_platform.engine.autocast`).
    """
    import torch

    if not hasattr(model, "cell_embedding"):
        raise TypeError(f"{type(model).__name__} has no cell_embedding(gene_ids, values, seq_lens); pass the model")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, embs = [], []
    try:
        with torch.inference_mode():
            for batch in batches:
                gene_ids, values, seq_lens = (t.to(device, non_blocking=True) for t in unmasked_inputs(batch))
                emb_BD = model.cell_embedding(gene_ids, values, seq_lens)
                ids.append(batch[schema.SOMA_JOINID].cpu().numpy().astype(np.int64))
                embs.append(emb_BD.float().cpu().numpy())
    finally:
        model.train(was_training)
    if not ids:
        raise ValueError("embed_cells got no batches: the data selection is empty")
    joinids, X = np.concatenate(ids), np.concatenate(embs).astype(np.float32)
    order = np.argsort(joinids, kind="stable")
    joinids, X = joinids[order], X[order]
    dup = joinids[1:][joinids[1:] == joinids[:-1]]
    if len(dup):
        raise ValueError(f"embed_cells: {len(dup)} cells delivered more than once (e.g. soma_joinid {dup[0]})")
    return joinids, X


def write_zarr(path: str | Path, joinids: np.ndarray, X: np.ndarray, *, attrs: Mapping[str, Any] | None = None) -> Path:
    """A zarr v3 group at `path`: arrays `soma_joinid` int64 [N] and `X_scfm` float32 [N, D], plus `attrs`."""
    import zarr

    if len(joinids) != len(X):
        raise ValueError(f"joinids [{len(joinids)}] and X {X.shape} disagree on N")
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("soma_joinid", data=np.asarray(joinids, dtype=np.int64))
    chunk_rows = max(1, min(len(X), (1 << 22) // max(1, 4 * X.shape[1])))  # ~4 MiB chunks of whole rows
    root.create_array(EMBED_KEY, data=np.asarray(X, dtype=np.float32), chunks=(chunk_rows, X.shape[1]))
    root.attrs.update(dict(attrs or {}))
    return Path(path)


def read_zarr(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(soma_joinid [N], X [N, D], attrs) of a store `write_zarr` wrote."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return root["soma_joinid"][:], root[EMBED_KEY][:], dict(root.attrs)


def write_h5ad(
    path: str | Path,
    joinids: np.ndarray,
    X: np.ndarray,
    obs: pd.DataFrame | None = None,
    *,
    source: str | Path | None = None,
) -> Path:
    """An h5ad with obsm["X_scfm"] = X [N, D].

    With `source` (the h5ad the cells came from, one cell per row in soma_joinid order) it is a copy of that file
    with the embedding added; otherwise it holds no expression, only `obs` rows for `joinids` (index: soma_joinid).
    """
    import anndata as ad
    import pandas as pd

    if source is not None:
        adata = ad.read_h5ad(source)
        if adata.n_obs != len(X):
            raise ValueError(f"{source} has {adata.n_obs} cells but {len(X)} were embedded")
    else:
        frame = obs.reindex(joinids) if obs is not None else pd.DataFrame(index=joinids)
        frame.index = pd.Index([str(i) for i in joinids], name="cell")
        for col in frame.columns:
            if frame[col].dtype == object:
                frame[col] = frame[col].astype("category")
        adata = ad.AnnData(obs=frame)
    adata.obsm[EMBED_KEY] = np.asarray(X, dtype=np.float32)
    adata.obs["soma_joinid"] = np.asarray(joinids, dtype=np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path
