"""Shared fixtures of the data-service tests (import the names you use from this module)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfm_data_service import DataConfig

SYNTHETIC_CELLS = 1500


@pytest.fixture(scope="session")
def demo_atlas(tmp_path_factory) -> str:
    """A demo atlas: 700 PBMC cells + SYNTHETIC_CELLS synthetic cells (built once per session)."""
    from scfm_data_service import build_demo_atlas

    uri = str(tmp_path_factory.mktemp("data") / "demo_atlas")
    build_demo_atlas(uri, synthetic_cells=SYNTHETIC_CELLS)
    return uri


def small_config(atlas: str, **kw) -> DataConfig:
    """Small batches and blocks, so a 2k-cell atlas gives many steps, blocks and read units."""
    base = dict(
        atlas=atlas,
        max_len=256,
        tokens_per_batch=2048,
        max_cells_per_batch=32,
        shuffle_block_cells=256,
        bucket_window_batches=8,
        engine="local",
        val_fraction=0.05,
    )
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="session")
def local_ray():
    """A real local Ray (2 CPUs, no dashboard), shut down at the end of the session if this fixture started it."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


def write_h5ad(
    path: Path,
    x: np.ndarray,
    genes: list[str],
    *,
    gene_col: str | None = "feature_id",
    obs: dict | None = None,
    raw: np.ndarray | None = None,
) -> Path:
    """Write a small .h5ad with counts `x` [cells, genes]; gene ids in var[gene_col] (or var_names if None)."""
    n = x.shape[0]
    var = pd.DataFrame(index=[f"sym{i}" for i in range(len(genes))] if gene_col else genes)
    if gene_col:
        var[gene_col] = genes
    o = pd.DataFrame(obs or {}, index=[f"{path.stem}-c{i}" for i in range(n)])
    adata = anndata.AnnData(X=sp.csr_matrix(x), obs=o, var=var)
    if raw is not None:
        adata.raw = anndata.AnnData(X=sp.csr_matrix(raw), var=var)
    adata.write_h5ad(path)
    return path


def tree_digest(root: str | Path) -> dict[str, str]:
    """{relative path: sha1} of every file under root (to prove a directory is unchanged)."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def random_counts(rng: np.random.Generator, n: int, g: int, density: float = 0.3) -> np.ndarray:
    """Dense float32 counts [n, g] with about `density` non-zeros, every cell with ≥ 1 count."""
    x = rng.poisson(3.0, size=(n, g)) * (rng.random((n, g)) < density)
    x[np.arange(n), rng.integers(0, g, n)] += 1
    return x.astype(np.float32)
