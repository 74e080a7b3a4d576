"""scfm data service: h5ad → TileDB-SOMA atlas → tokenized, length-bucketed batches over Ray Data.

Public API:
    DataConfig, DataError, schema constants (PAD_ID, CLS_ID, MASK_ID, N_SPECIAL, batch keys)
    iter_batches(cfg, *, rank, world_size, epoch, start_step=0, split="train")   batches of one rank
    iter_train_batches(cfg, *, epoch, start_step=0, split="train")   same, rank/world from the Ray Train context
    steps_per_epoch(cfg, world_size), vocab_size(cfg), StreamState, epoch_plan(...)
    ingest(uri, files, *, use_raw=False, progress=True), build_demo_atlas(uri, synthetic_cells=...),
    atlas_info(uri), read_obs(uri, columns), write_token_cache(cfg, out)
    build_aligned_atlas(uri, file, *, reference, ...)   one .h5ad on a training atlas's vocabulary (for eval)

Heavy modules (tiledbsoma, ray, zarr, torch) load on first use of a name that needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from scfm_data_service.config import DataConfig
from scfm_data_service.errors import DataError
from scfm_data_service.schema import (
    BATCH_KEYS,
    CLS_ID,
    GENE_IDS,
    MASK,
    MASK_ID,
    N_SPECIAL,
    PAD_ID,
    SEQ_LENS,
    SOMA_JOINID,
    TARGET_GENE_IDS,
    TARGET_VALUES,
    VALUES,
)

_LAZY = {
    "iter_batches": "stream",
    "iter_train_batches": "stream",
    "steps_per_epoch": "stream",
    "vocab_size": "stream",
    "StreamState": "stream",
    "epoch_plan": "stream",
    "ingest": "atlas",
    "atlas_info": "atlas",
    "build_aligned_atlas": "atlas",
    "AlignedAtlas": "atlas",
    "read_obs": "atlas",
    "build_demo_atlas": "demo",
    "write_token_cache": "cache",
}

if TYPE_CHECKING:
    from scfm_data_service.atlas import AlignedAtlas, atlas_info, build_aligned_atlas, ingest, read_obs
    from scfm_data_service.cache import write_token_cache
    from scfm_data_service.demo import build_demo_atlas
    from scfm_data_service.stream import (
        StreamState,
        epoch_plan,
        iter_batches,
        iter_train_batches,
        steps_per_epoch,
        vocab_size,
    )


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"scfm_data_service.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'scfm_data_service' has no attribute {name!r}")


__all__ = [
    "BATCH_KEYS",
    "CLS_ID",
    "GENE_IDS",
    "MASK",
    "MASK_ID",
    "N_SPECIAL",
    "PAD_ID",
    "SEQ_LENS",
    "SOMA_JOINID",
    "TARGET_GENE_IDS",
    "TARGET_VALUES",
    "VALUES",
    "AlignedAtlas",
    "DataConfig",
    "DataError",
    "StreamState",
    "atlas_info",
    "build_aligned_atlas",
    "build_demo_atlas",
    "epoch_plan",
    "ingest",
    "iter_batches",
    "iter_train_batches",
    "read_obs",
    "steps_per_epoch",
    "vocab_size",
    "write_token_cache",
]
