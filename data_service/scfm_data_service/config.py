"""`DataConfig`: everything the data service needs, and nothing else.

This dataclass is the `data` section of a run config (OmegaConf structured config), so the data service can be
driven on its own: `iter_batches(DataConfig(atlas=...), rank=0, world_size=1, epoch=0)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class DataConfig:
    atlas: str = MISSING  # URI of the TileDB-SOMA experiment (local path or object-store URI)
    tokens: str | None = None  # optional pre-tokenized zarr store (`launch atlas tokenize`); read instead of atlas
    measurement: str = "RNA"  # SOMA measurement holding the genes
    layer: str = "raw"  # X layer with raw counts
    tokenizer: str = "rank"  # rank (rank-value, Geneformer) | binned (binned-value, scGPT)
    n_bins: int = 51  # expression bins for the binned tokenizer (bin 0 = not expressed)
    max_len: int = 2048  # tokens per cell, CLS included; longer cells are truncated
    tokens_per_batch: int = 16384  # token budget of one batch (padded tokens count)
    max_cells_per_batch: int = 256  # cap on cells in one batch, whatever their length
    mask_ratio: float = 0.15  # fraction of a cell's gene tokens masked for the objective
    seed: int = 0  # seeds the per-epoch global shuffle and the masking
    val_fraction: float = 0.02  # held-out cells (by soma_joinid hash) for validation loss
    shuffle_block_cells: int = 4096  # cells of a shuffle window (4 runs of consecutive soma_joinids), batched together
    bucket_window_batches: int = 1024  # max steps per Ray Data read task (a task reads one window's steps of a rank)
    read_workers: int = 2  # Ray Data parallelism: concurrent read tasks (and tokenizer actors with tokenize_on=actors)
    tokenize_on: str = "read"  # read: each read task tokenizes its unit | actors: map_batches on an actor pool
    bucket_ratio: float = 1.05  # length-bucket edges grow by this factor: padding < 1 - 1/ratio of a batch
    engine: str = "ray"  # ray (the Ray Data pipeline; training) | local (same read/tokenize code in-process)
    task_cpus: float = 0.1  # CPUs each Ray Data read task or tokenizer actor reserves (shares nodes with trainers)
