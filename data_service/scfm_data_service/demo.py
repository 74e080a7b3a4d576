"""A ready atlas without download: the labelled PBMC cells that ship with scanpy plus synthetic cells.

- PBMC: scanpy's `10x_pbmc68k_reduced.h5ad` (700 cells, 765 genes keyed by symbol, labels in `bulk_labels`). Its
  `.raw.X` is log1p of per-cell normalized counts; counts are recovered per cell as expm1(x) / the cell's smallest
  non-zero expm1(x) (the smallest non-zero count of a cell is 1), rounded.
- Synthetic: cells drawn from cell-type programs. Each type scales a shared heavy-tailed gene popularity profile
  with its own up-regulated genes; a cell draws a log-normal library size and gamma-Poisson (negative binomial)
  counts. Expressed genes per cell span hundreds to a few thousand, which exercises length bucketing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm_data_service.atlas import Source, ingest_sources, standard_obs
from scfm_data_service.errors import DataError

PBMC_DATASET = "pbmc68k_reduced"
SYNTHETIC_DATASET = "synthetic"
DEFAULT_SYNTHETIC_CELLS = 5000


def pbmc_path() -> Path:
    import scanpy

    return Path(scanpy.__file__).parent / "datasets" / "10x_pbmc68k_reduced.h5ad"


def pbmc_source() -> Source:
    """The scanpy PBMC cells with recovered integer counts; cell_type from bulk_labels."""
    import warnings

    import anndata

    with warnings.catch_warnings():  # the shipped file predates current anndata encodings
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(pbmc_path())
    x = sp.csr_matrix(adata.raw.X, dtype=np.float64)
    x.data = np.expm1(x.data)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    row_min = np.full(x.shape[0], np.inf)
    np.minimum.at(row_min, rows, x.data)
    x.data = np.rint(x.data / row_min[rows])
    x = x.astype(np.float32)
    obs = adata.obs.copy()
    obs["cell_type"] = obs["bulk_labels"].astype(str)
    obs["tissue"] = "blood"
    obs["assay"] = "10x 3' v1"
    obs["donor_id"] = "pbmc68k"
    obs["suspension_type"] = "cell"
    genes = np.asarray(adata.raw.var_names.astype(str))
    return Source(
        PBMC_DATASET,
        str(pbmc_path()),
        x.shape[0],
        genes,
        genes,
        lambda: iter([(standard_obs(obs, PBMC_DATASET), x)]),
    )


def synthetic_genes(n_genes: int, shared: np.ndarray) -> np.ndarray:
    """Gene ids of the synthetic data: the shared ids first, then SYN00000-style ids."""
    extra = [f"SYN{i:05d}" for i in range(max(0, n_genes - len(shared)))]
    return np.concatenate([shared[:n_genes], np.asarray(extra, dtype=object)]).astype(str)


def synthetic_cells(
    n_cells: int,
    n_genes: int = 6000,
    n_types: int = 8,
    *,
    seed: int = 0,
    chunk: int = 2048,
) -> Iterator[tuple[pd.DataFrame, sp.csr_matrix]]:
    """Yield (obs, counts csr [n, n_genes]) chunks of synthetic cells with cell-type programs."""
    rng = np.random.default_rng(seed)
    popularity = rng.lognormal(mean=0.0, sigma=2.0, size=n_genes)
    programs = np.tile(popularity, (n_types, 1))
    for t in range(n_types):
        up = rng.choice(n_genes, size=n_genes // 40, replace=False)
        programs[t, up] *= rng.uniform(4, 30, size=len(up))
    programs /= programs.sum(axis=1, keepdims=True)
    theta = 2.0  # negative binomial inverse dispersion (gamma-Poisson mixture)
    done = 0
    while done < n_cells:
        n = min(chunk, n_cells - done)
        types = rng.integers(0, n_types, size=n)
        library = rng.lognormal(mean=8.3, sigma=0.7, size=n)
        mu = programs[types] * library[:, None]
        counts = rng.poisson(mu * rng.gamma(theta, 1.0 / theta, size=mu.shape))
        r, c = np.nonzero(counts)
        x = sp.csr_matrix((counts[r, c].astype(np.float32), (r, c)), shape=counts.shape)
        obs = pd.DataFrame(
            {
                "cell_type": [f"synthetic type {t}" for t in types],
                "donor_id": [f"synthetic donor {d}" for d in rng.integers(0, 4, size=n)],
                "tissue": "synthetic",
                "assay": "synthetic NB",
            },
            index=[f"syn-{done + i}" for i in range(n)],
        )
        yield obs, x
        done += n


def synthetic_source(n_cells: int, shared_genes: np.ndarray, *, n_genes: int = 6000, seed: int = 0) -> Source:
    genes = synthetic_genes(n_genes, shared_genes)

    def chunks() -> Iterator[tuple[pd.DataFrame, sp.csr_matrix]]:
        for obs, x in synthetic_cells(n_cells, n_genes, seed=seed):
            yield standard_obs(obs, SYNTHETIC_DATASET), x

    return Source(SYNTHETIC_DATASET, "synthetic generator", n_cells, genes, genes, chunks)


def build_demo_atlas(
    uri: str,
    synthetic_cells: int = DEFAULT_SYNTHETIC_CELLS,
    *,
    include_pbmc: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    seed: int = 0,
) -> None:
    """Create the demo atlas at `uri`: PBMC (700 labelled cells) + `synthetic_cells` synthetic cells."""
    import tiledbsoma as soma

    if synthetic_cells < 0:
        raise DataError(f"--synthetic-cells={synthetic_cells} must be ≥ 0")
    if soma.Experiment.exists(uri) or (Path(uri).exists() and "://" not in uri):
        if not overwrite or "://" in uri:
            raise DataError(f"{uri}: already exists; choose a new atlas path (or remove it first)")
        shutil.rmtree(uri)
    sources = []
    pbmc = pbmc_source()
    if include_pbmc:
        sources.append(pbmc)
    if synthetic_cells:
        sources.append(synthetic_source(synthetic_cells, pbmc.gene_ids, seed=seed))
    if not sources:
        raise DataError("demo atlas needs PBMC cells or --synthetic-cells > 0")
    ingest_sources(uri, sources, progress=progress)
