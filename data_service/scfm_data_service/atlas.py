"""The atlas: a TileDB-SOMA Experiment of raw counts, one dataset per ingested file.

Layout (URI = local path or object-store URI):

    obs                      soma_joinid, dataset_id, obs_id, CELLxGENE schema columns ("unknown" where absent),
                             nnz (expressed genes), raw_sum (total counts)
    ms/RNA/var               soma_joinid (= gene index of the vocabulary), feature_id (stable id), feature_name
    ms/RNA/X/raw             float32 sparse [cells, genes] raw counts
    experiment metadata      scfm.* keys: committed cell/gene counts, datasets, gene non-zero medians

Ingest validates every file before the first write, so bad input leaves the atlas exactly as it was. The gene
vocabulary only grows: new genes get the next ids, existing ids are never reused or reordered.
`build_aligned_atlas` writes one file's cells on another atlas's vocabulary and medians (evaluating a model
trained on that atlas on a new file).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from scfm_data_service.errors import DataError

MEASUREMENT = "RNA"
LAYER = "raw"
CHUNK_CELLS = 16384  # cells written (and scanned for statistics) at a time
UNKNOWN = "unknown"
OBS_TEXT_COLUMNS = (
    "dataset_id",
    "obs_id",
    "cell_type",
    "cell_type_ontology_term_id",
    "tissue",
    "tissue_ontology_term_id",
    "tissue_type",
    "assay",
    "assay_ontology_term_id",
    "disease",
    "disease_ontology_term_id",
    "donor_id",
    "sex",
    "sex_ontology_term_id",
    "development_stage",
    "development_stage_ontology_term_id",
    "self_reported_ethnicity",
    "self_reported_ethnicity_ontology_term_id",
    "suspension_type",
)
GENE_ID_COLUMNS = ("feature_id", "gene_ids", "gene_id", "ensembl_id")  # first present wins, else var_names
META_PREFIX = "scfm."


@dataclass
class Source:
    """One dataset to ingest: validated gene keys plus a way to (re)produce its cells in chunks."""

    name: str  # dataset_id
    label: str  # how messages name it (file path)
    n_cells: int
    gene_ids: np.ndarray  # str [G] stable ids, unique
    gene_names: np.ndarray  # str [G] symbols
    chunks: Callable[[], Iterator[tuple[pd.DataFrame, sp.csr_matrix]]]  # (obs [n, *], counts [n, G]) chunks


# ---------------------------------------------------------------- validation


def check_counts(label: str, x: sp.csr_matrix | np.ndarray, obs_names: Sequence, gene_ids: Sequence) -> None:
    """Raise DataError unless every value is finite and ≥ 0 (names the first offending cell and gene)."""
    data = x.data if sp.issparse(x) else np.asarray(x).ravel()
    if data.dtype.kind not in "fiub":
        raise DataError(f"{label}: matrix dtype {data.dtype} is not numeric; counts must be numbers ≥ 0")
    for what, bad in (
        ("NaN", np.isnan(data) if data.dtype.kind == "f" else None),
        ("infinite", np.isinf(data) if data.dtype.kind == "f" else None),
        ("negative", data < 0),
    ):
        if bad is None or not bad.any():
            continue
        first = int(np.flatnonzero(bad)[0])
        if sp.issparse(x):
            row = int(np.searchsorted(x.indptr, first, side="right") - 1)
            col = int(x.indices[first])
        else:
            row, col = divmod(first, x.shape[1])
        raise DataError(
            f"{label}: {int(bad.sum())} {what} value(s) in the count matrix (first at cell "
            f"{obs_names[row]!r}, gene {gene_ids[col]!r}); counts must be finite and ≥ 0"
        )


def _gene_keys(label: str, var: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    col = next((c for c in GENE_ID_COLUMNS if c in var.columns), None)
    ids = (var[col] if col else pd.Series(var.index)).astype(str).to_numpy()
    names = (var["feature_name"] if "feature_name" in var.columns else pd.Series(var.index)).astype(str).to_numpy()
    if len(ids) == 0:
        raise DataError(f"{label}: no genes (var is empty); a dataset needs at least one gene")
    empty = (ids == "") | (ids == "nan")
    if empty.any():
        raise DataError(f"{label}: {int(empty.sum())} empty gene id(s) in var {col or 'index'}; ids must be set")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise DataError(
            f"{label}: {len(dup)} duplicate gene id(s) in var {col or 'index'} (e.g. {dup[0]!r}); "
            "gene ids must be unique"
        )
    return ids, names


def standard_obs(obs: pd.DataFrame, dataset_id: str) -> pd.DataFrame:
    """obs reduced to the atlas columns (strings; "unknown" where the source lacks a column)."""
    out = pd.DataFrame(index=range(len(obs)))
    for c in OBS_TEXT_COLUMNS:
        if c == "dataset_id":
            out[c] = dataset_id
        elif c == "obs_id":
            out[c] = obs.index.astype(str).to_numpy()
        elif c in obs.columns:
            out[c] = obs[c].astype(str).to_numpy()
        else:
            out[c] = UNKNOWN
    return out


def _read_h5ad(path: Path, use_raw: bool):
    import anndata

    label = str(path)
    if not path.is_file():
        raise DataError(f"{label}: no such file; give paths to .h5ad files")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{label}: cannot read as .h5ad ({msg})") from None
    if use_raw:
        if adata.raw is None:
            raise DataError(f"{label}: has no .raw; ingest .X instead (drop --use-raw)")
        x, var = adata.raw.X, adata.raw.var
    else:
        x, var = adata.X, adata.var
    if x is None:
        raise DataError(f"{label}: .X is empty; the count matrix must be in .X or .raw.X")
    return adata.obs, var, x


def file_source(path: str | Path, *, use_raw: bool, dataset_id: str | None = None) -> Source:
    """Read and validate one .h5ad file (DataError on bad input); the Source re-reads it when written."""
    path = Path(path)
    label = str(path)
    obs, var, x = _read_h5ad(path, use_raw)
    if x.shape[0] == 0:
        raise DataError(f"{label}: no cells (0 rows in obs); a dataset needs at least one cell")
    ids, names = _gene_keys(label, var)
    x = x if sp.issparse(x) else np.asarray(x)
    check_counts(label, sp.csr_matrix(x) if sp.issparse(x) else x, obs.index, ids)
    name = dataset_id or path.stem
    n = x.shape[0]
    del x

    def chunks() -> Iterator[tuple[pd.DataFrame, sp.csr_matrix]]:
        obs2, _, x2 = _read_h5ad(path, use_raw)
        x2 = sp.csr_matrix(x2, dtype=np.float32)
        for a in range(0, n, CHUNK_CELLS):
            yield standard_obs(obs2.iloc[a : a + CHUNK_CELLS], name), x2[a : a + CHUNK_CELLS]

    return Source(name, label, n, ids, names, chunks)


# ---------------------------------------------------------------- metadata


def _meta_get(exp, key: str, default=None):
    return exp.metadata.get(META_PREFIX + key, default)


def read_meta(uri: str) -> dict:
    """The atlas's scfm.* metadata: n_cells, n_genes, datasets (list of dicts), gene_median (float32 [G])."""
    import tiledbsoma as soma

    try:
        exp = soma.Experiment.open(uri)
    except Exception as e:
        raise DataError(f"{uri}: not an atlas (cannot open as a SOMA experiment: {type(e).__name__})") from None
    with exp:
        n_cells = _meta_get(exp, "n_cells")
        if n_cells is None:
            raise DataError(f"{uri}: SOMA experiment has no scfm metadata; create it with `launch atlas ingest`")
        med = _meta_get(exp, "gene_median", "")
        return {
            "n_cells": int(n_cells),
            "n_genes": int(_meta_get(exp, "n_genes")),
            "datasets": json.loads(_meta_get(exp, "datasets", "[]")),
            "gene_median": np.frombuffer(base64.b64decode(med), dtype=np.float32).copy(),
        }


def _write_meta(exp, n_cells: int, n_genes: int, datasets: list[dict], median: np.ndarray) -> None:
    exp.metadata[META_PREFIX + "gene_median"] = base64.b64encode(median.astype(np.float32).tobytes()).decode()
    exp.metadata[META_PREFIX + "datasets"] = json.dumps(datasets)
    exp.metadata[META_PREFIX + "n_genes"] = int(n_genes)
    exp.metadata[META_PREFIX + "n_cells"] = int(n_cells)  # written last: marks the ingest committed


# ---------------------------------------------------------------- writing


def _obs_schema(extra: Sequence[str] = ()) -> pa.Schema:
    fields = [pa.field("soma_joinid", pa.int64())]
    fields += [pa.field(c, pa.large_string()) for c in (*OBS_TEXT_COLUMNS, *extra)]
    fields += [pa.field("nnz", pa.int64()), pa.field("raw_sum", pa.float64())]
    return pa.schema(fields)


def _var_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("soma_joinid", pa.int64()),
            pa.field("feature_id", pa.large_string()),
            pa.field("feature_name", pa.large_string()),
        ]
    )


def _create(uri: str, n_cells: int, n_genes: int, extra_obs: Sequence[str] = ()) -> None:
    import tiledbsoma as soma

    with soma.Experiment.create(uri) as exp:
        exp.add_new_dataframe("obs", schema=_obs_schema(extra_obs), domain=[(0, n_cells - 1)])
        exp.add_new_collection("ms")
        ms = exp.ms.add_new_collection(MEASUREMENT, soma.Measurement)
        ms.add_new_dataframe("var", schema=_var_schema(), domain=[(0, n_genes - 1)])
        ms.add_new_collection("X")
        ms.X.add_new_sparse_ndarray(LAYER, type=pa.float32(), shape=(n_cells, n_genes))


def _existing_genes(uri: str) -> pd.Series:
    import tiledbsoma as soma

    with soma.open(f"{uri.rstrip('/')}/ms/{MEASUREMENT}/var") as var:
        t = var.read(column_names=["soma_joinid", "feature_id"]).concat().to_pandas()
    return pd.Series(t["soma_joinid"].to_numpy(), index=t["feature_id"].to_numpy())


def ingest_sources(uri: str, sources: Sequence[Source], *, progress: bool = True) -> list[str]:
    """Append validated sources to the atlas at `uri` (created if absent); recompute gene statistics."""
    import tiledbsoma as soma
    import tiledbsoma.io

    from scfm_data_service.stats import atlas_gene_medians

    exists = soma.Experiment.exists(uri)
    meta = read_meta(uri) if exists else {"n_cells": 0, "n_genes": 0, "datasets": []}
    taken = {d["dataset_id"] for d in meta["datasets"]}
    for s in sources:
        if s.name in taken:
            raise DataError(f"{s.label}: dataset_id {s.name!r} is already in the atlas; rename the file")
        taken.add(s.name)
    genes = _existing_genes(uri) if exists else pd.Series(dtype=np.int64)
    new_ids, new_names = [], []
    gene_maps = []
    for s in sources:
        known = dict(zip(genes.index, genes.to_numpy(), strict=True))
        fresh = [i for i, g in enumerate(s.gene_ids) if g not in known]
        base = len(genes)
        add = pd.Series(np.arange(base, base + len(fresh), dtype=np.int64), index=s.gene_ids[fresh])
        genes = pd.concat([genes, add])
        new_ids += list(s.gene_ids[fresh])
        new_names += list(s.gene_names[fresh])
        gene_maps.append(genes.reindex(s.gene_ids).to_numpy().astype(np.int64))
    n_genes = len(genes)
    n_cells = meta["n_cells"] + sum(s.n_cells for s in sources)

    if not exists:
        _create(uri, n_cells, n_genes)
    else:
        tiledbsoma.io.resize_experiment(uri, nobs=n_cells, nvars={MEASUREMENT: n_genes})
    with soma.Experiment.open(uri, "w") as exp:
        if new_ids:
            ms = exp.ms[MEASUREMENT]
            ids = np.arange(meta["n_genes"], n_genes, dtype=np.int64)
            ms.var.write(pa.table({"soma_joinid": ids, "feature_id": new_ids, "feature_name": new_names}))

    datasets = list(meta["datasets"])
    row = meta["n_cells"]
    with _progress(progress) as bar, soma.Experiment.open(uri, "w") as exp:
        for s, gmap in zip(sources, gene_maps, strict=True):
            first = row
            row = _write_cells(exp, s, gmap, row, bar)
            datasets.append({"dataset_id": s.name, "source": s.label, "n_cells": s.n_cells, "first_joinid": first})
    median = atlas_gene_medians(uri, n_cells, n_genes, progress=progress)
    with soma.Experiment.open(uri, "w") as exp:
        _write_meta(exp, n_cells, n_genes, datasets, median)
    return [s.name for s in sources]


def _write_cells(exp, s: Source, gmap: np.ndarray, row: int, bar, extra_obs: Sequence[str] = ()) -> int:
    """Write the cells of `s` as rows row.. of obs and X (source gene column j → atlas gene gmap[j]); next row."""
    X = exp.ms[MEASUREMENT].X[LAYER]
    task = bar.add_task(f"ingest {s.name}", total=s.n_cells) if bar else None
    first = row
    for obs, x in s.chunks():
        x = sp.csr_matrix(x, dtype=np.float32)
        x.eliminate_zeros()
        check_counts(s.label, x, obs["obs_id"].to_numpy(), s.gene_ids)
        n = x.shape[0]
        coo = x.tocoo()
        X.write(
            pa.table(
                {
                    "soma_dim_0": coo.row.astype(np.int64) + row,
                    "soma_dim_1": gmap[coo.col],
                    "soma_data": coo.data.astype(np.float32),
                }
            )
        )
        tbl = pa.Table.from_pandas(obs, preserve_index=False)
        tbl = tbl.append_column("nnz", pa.array(np.diff(x.indptr).astype(np.int64)))
        tbl = tbl.append_column("raw_sum", pa.array(np.asarray(x.sum(axis=1)).ravel().astype(np.float64)))
        tbl = tbl.add_column(0, "soma_joinid", pa.array(np.arange(row, row + n, dtype=np.int64)))
        exp.obs.write(tbl.cast(_obs_schema(extra_obs)))
        row += n
        if bar:
            bar.advance(task, n)
    if row - first != s.n_cells:
        raise DataError(f"{s.label}: produced {row - first} cells, expected {s.n_cells}")
    return row


def ingest(uri: str, files: Iterable[str | Path], *, use_raw: bool = False, progress: bool = True) -> list[str]:
    """Ingest .h5ad files into the atlas at `uri` (created if absent); one dataset per file, id = file stem.

    Counts come from `.X` (or `.raw.X` with use_raw). Every file is validated before anything is written: a bad
    file raises DataError naming it and the problem, and leaves the atlas exactly as it was.
    Returns the new dataset ids.
    """
    files = [Path(f) for f in files]
    if not files:
        raise DataError("ingest: no files given; pass one or more .h5ad files")
    sources = [file_source(f, use_raw=use_raw) for f in files]
    return ingest_sources(uri, sources, progress=progress)


# ---------------------------------------------------------------- one file on a reference vocabulary (eval)

MIN_MATCHED_FRACTION = 0.1  # fewer of a file's genes in the vocabulary than this: wrong gene ids, not a subset
RESERVED_OBS = ("soma_joinid", "nnz", "raw_sum")


@dataclass
class AlignedAtlas:
    """What `build_aligned_atlas` wrote: an atlas of one file's cells on a reference atlas's gene vocabulary."""

    uri: str
    reference: str
    dataset_id: str
    n_cells: int
    n_file_genes: int  # genes of the file
    n_matched: int  # of those, genes of the reference vocabulary (kept)
    n_dropped: int  # the rest (not in the vocabulary: dropped)

    def summary(self) -> str:
        return (
            f"{self.n_matched} of the file's {self.n_file_genes} genes match the training vocabulary of "
            f"{self.reference}; {self.n_dropped} dropped"
        )


def _reference_var(uri: str) -> pd.DataFrame:
    import tiledbsoma as soma

    with soma.open(f"{uri.rstrip('/')}/ms/{MEASUREMENT}/var") as var:
        t = var.read(column_names=["soma_joinid", "feature_id", "feature_name"]).concat().to_pandas()
    return t.sort_values("soma_joinid").reset_index(drop=True)


def build_aligned_atlas(
    uri: str,
    file: str | Path,
    *,
    reference: str,
    use_raw: bool = False,
    obs_columns: Sequence[str] = (),
    progress: bool = False,
) -> AlignedAtlas:
    """Write a new atlas at `uri` holding the cells of one .h5ad `file` on the gene vocabulary of atlas `reference`.

    The new atlas has the reference's var (same genes, same soma_joinids) and gene medians (copied, not
    recomputed from the file), so the data service tokenizes its cells exactly as it tokenized the reference's: a
    model trained on the reference can embed them. The file's genes are matched by the stable id ingest uses
    (var feature_id / gene_ids / gene_id / ensembl_id, else var_names); genes outside the vocabulary are dropped.
    Cells keep the file's row order (soma_joinid = row) and obs_names (obs_id); obs holds the atlas columns plus
    `obs_columns` of the file (as text). Counts come from `.X` (or `.raw.X` with use_raw) and are validated as by
    ingest. DataError (one line naming the file) on bad input, a missing obs column, or when no genes or fewer
    than MIN_MATCHED_FRACTION of them match (the file then uses another kind of gene id than the reference).
    """
    import tiledbsoma as soma

    path = Path(file)
    label = str(path)
    if soma.Experiment.exists(uri):
        raise DataError(f"{uri}: already exists; give a new path for the aligned atlas")
    meta = read_meta(reference)
    obs, var, x = _read_h5ad(path, use_raw)
    if x.shape[0] == 0:
        raise DataError(f"{label}: no cells (0 rows in obs); a dataset needs at least one cell")
    missing = [c for c in obs_columns if c not in obs.columns]
    if missing:
        raise DataError(
            f"{label}: no obs column {', '.join(map(repr, missing))}; its obs columns: "
            f"{', '.join(map(str, obs.columns)) or '(none)'}"
        )
    reserved = [c for c in obs_columns if c in RESERVED_OBS]
    if reserved:
        raise DataError(f"{label}: obs column {reserved[0]!r} is reserved by the atlas; pick another label column")
    ids, names = _gene_keys(label, var)
    x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    check_counts(label, x, obs.index, ids)

    ref = _reference_var(reference)
    if len(ref) != meta["n_genes"]:
        raise DataError(f"{reference}: var has {len(ref)} genes but its metadata says {meta['n_genes']}")
    joinid = pd.Series(ref["soma_joinid"].to_numpy(np.int64), index=ref["feature_id"].astype(str).to_numpy())
    gmap = joinid.reindex(ids).to_numpy()
    keep = np.flatnonzero(~np.isnan(gmap))
    if len(keep) == 0 or len(keep) < MIN_MATCHED_FRACTION * len(ids):
        raise DataError(
            f"{label}: only {len(keep)} of its {len(ids)} gene ids are in the vocabulary of {reference} "
            f"(file ids like {ids[0]!r}, vocabulary ids like {joinid.index[0]!r}); "
            "give the genes the same kind of ids the training atlas has (var feature_id or var_names)"
        )
    gmap = gmap[keep].astype(np.int64)
    extra = [c for c in dict.fromkeys(obs_columns) if c not in OBS_TEXT_COLUMNS]
    name = path.stem
    n = x.shape[0]

    def chunks() -> Iterator[tuple[pd.DataFrame, sp.csr_matrix]]:
        for a in range(0, n, CHUNK_CELLS):
            part = obs.iloc[a : a + CHUNK_CELLS]
            o = standard_obs(part, name)
            for c in extra:
                o[c] = part[c].astype(str).to_numpy()
            yield o, sp.csr_matrix(x[a : a + CHUNK_CELLS], dtype=np.float32)[:, keep]

    source = Source(name, label, n, ids[keep], names[keep], chunks)
    _create(uri, n, meta["n_genes"], extra)
    with soma.Experiment.open(uri, "w") as exp:
        exp.ms[MEASUREMENT].var.write(pa.Table.from_pandas(ref, preserve_index=False).cast(_var_schema()))
    with _progress(progress) as bar, soma.Experiment.open(uri, "w") as exp:
        _write_cells(exp, source, gmap, 0, bar, extra)
        exp.metadata[META_PREFIX + "reference"] = str(reference)
        datasets = [{"dataset_id": name, "source": label, "n_cells": n, "first_joinid": 0}]
        _write_meta(exp, n, meta["n_genes"], datasets, meta["gene_median"])
    return AlignedAtlas(uri, str(reference), name, n, len(ids), len(keep), len(ids) - len(keep))


def _progress(enabled: bool):
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False
    )


# ---------------------------------------------------------------- reading


def read_obs(uri: str, columns: Sequence[str] = ("cell_type", "dataset_id")) -> pd.DataFrame:
    """obs columns of the committed cells, as a DataFrame indexed by soma_joinid."""
    import tiledbsoma as soma

    n = read_meta(uri)["n_cells"]
    with soma.open(f"{uri.rstrip('/')}/obs") as obs:
        allowed = set(obs.schema.names) - {"soma_joinid"}
        bad = [c for c in columns if c not in allowed]
        if bad:
            raise DataError(f"read_obs: unknown obs column(s) {bad}; allowed: {sorted(allowed)}")
        t = obs.read(coords=(slice(0, n - 1),), column_names=["soma_joinid", *columns]).concat().to_pandas()
    return t.set_index("soma_joinid").sort_index()


def cell_nnz(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(soma_joinid int64 [N], nnz int64 [N]) of the committed cells, sorted by joinid."""
    df = read_obs(uri, ["nnz"])
    return df.index.to_numpy(np.int64), df["nnz"].to_numpy(np.int64)


def atlas_info(uri: str) -> dict:
    """Datasets, cells, genes, nnz and per-dataset cell-type counts of the atlas."""
    meta = read_meta(uri)
    obs = read_obs(uri, ["dataset_id", "cell_type", "nnz"])
    datasets = []
    for d in meta["datasets"]:
        sub = obs[obs["dataset_id"] == d["dataset_id"]]
        datasets.append(
            {
                "dataset_id": d["dataset_id"],
                "source": d["source"],
                "cells": len(sub),
                "nnz": int(sub["nnz"].sum()),
                "cell_types": {str(k): int(v) for k, v in sub["cell_type"].value_counts().items()},
            }
        )
    return {
        "uri": uri,
        "cells": meta["n_cells"],
        "genes": meta["n_genes"],
        "nnz": int(obs["nnz"].sum()),
        "datasets": datasets,
    }
