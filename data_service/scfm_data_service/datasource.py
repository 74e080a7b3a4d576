"""Reading planned cells: from the atlas (raw counts, tokenized on an actor pool) or from the zarr token cache.

A read unit is a run of consecutive steps of one rank: its cells (in plan order) and their step numbers. Reading
a unit yields one Arrow table, one row per cell, in plan order:

    atlas:  soma_joinid int64, step int64, genes list<int64>, counts list<float32>   → Tokenizer →
    tokens: soma_joinid int64, step int64, tokens list<int32>, values list<float32>

`PlanDatasource` is the Ray Data Datasource with one read task per unit; `Tokenizer` is the map_batches callable
(run on an actor pool so the gene medians are loaded once per actor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from scfm_data_service.tokenize import tokenize

_OPEN: dict[tuple, object] = {}  # per-process cache of opened arrays (Ray workers are reused across tasks)


@dataclass(frozen=True)
class Unit:
    """Cells of consecutive steps of one rank, in plan order."""

    cells: np.ndarray  # int64 [n] soma_joinids
    steps: np.ndarray  # int64 [n] step of each cell


def take_rows(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(new indptr, element index) selecting CSR rows `rows` in that order."""
    lens = np.diff(indptr)[rows]
    out = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    idx = np.repeat(indptr[rows] - out[:-1], lens) + np.arange(out[-1], dtype=np.int64)
    return out, idx


def _list(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))


def _csr(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    off = arr.offsets.to_numpy().astype(np.int64)
    flat = arr.values.to_numpy(zero_copy_only=False)
    return off - off[0], flat[off[0] : off[-1]]


@dataclass(frozen=True)
class AtlasReader:
    """Raw counts of cells from the atlas X layer."""

    uri: str
    measurement: str = "RNA"
    layer: str = "raw"

    def _x(self):
        key = ("x", self.uri, self.measurement, self.layer)
        if key not in _OPEN:
            import tiledbsoma as soma

            _OPEN[key] = soma.open(f"{self.uri.rstrip('/')}/ms/{self.measurement}/X/{self.layer}")
        return _OPEN[key]

    def read(self, unit: Unit) -> pa.Table:
        uniq = np.unique(unit.cells)
        # unordered reads are several times faster than row-major ones; group rows here instead
        tbl = self._x().read(coords=(uniq,), result_order="auto").tables().concat()
        rows = tbl["soma_dim_0"].to_numpy()
        genes, counts = tbl["soma_dim_1"].to_numpy(), tbl["soma_data"].to_numpy()
        if len(rows) > 1 and (np.diff(rows) < 0).any():
            order = np.argsort(rows, kind="stable")
            rows, genes, counts = rows[order], genes[order], counts[order]
        indptr = np.searchsorted(rows, uniq, side="left").astype(np.int64)
        indptr = np.append(indptr, len(rows))
        out, idx = take_rows(indptr, np.searchsorted(uniq, unit.cells))
        return pa.table(
            {
                "soma_joinid": pa.array(unit.cells, pa.int64()),
                "step": pa.array(unit.steps, pa.int64()),
                "genes": _list(out, genes[idx]),
                "counts": _list(out, counts[idx]),
            }
        )


@dataclass(frozen=True)
class ZarrReader:
    """Pre-tokenized cells from the zarr token cache (row = soma_joinid)."""

    path: str

    def _arrays(self):
        key = ("zarr", self.path)
        if key not in _OPEN:
            import zarr

            root = zarr.open_group(self.path, mode="r")
            _OPEN[key] = (root["offsets"][:], root["tokens"], root["values"])
        return _OPEN[key]

    def read(self, unit: Unit) -> pa.Table:
        offsets, tokens, values = self._arrays()
        uniq = np.unique(unit.cells)
        # contiguous runs of needed cells (gaps ≤ 64 cells are read through) → one slice each
        brk = np.flatnonzero(np.diff(uniq) > 64) + 1
        parts_t, parts_v, starts, lo_of = [], [], [], []
        base = 0
        for run in np.split(uniq, brk):
            a, b = int(offsets[run[0]]), int(offsets[run[-1] + 1])
            parts_t.append(tokens[a:b])
            parts_v.append(values[a:b])
            starts.append(offsets[run] - a + base)
            lo_of.append(run)
            base += b - a
        flat_t = np.concatenate(parts_t) if parts_t else np.zeros(0, np.int32)
        flat_v = np.concatenate(parts_v) if parts_v else np.zeros(0, np.float32)
        start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        sel = np.searchsorted(uniq, unit.cells)
        lens = (offsets[uniq + 1] - offsets[uniq])[sel]
        out = np.zeros(len(sel) + 1, dtype=np.int64)
        np.cumsum(lens, out=out[1:])
        idx = np.repeat(start[sel] - out[:-1], lens) + np.arange(out[-1], dtype=np.int64)
        return pa.table(
            {
                "soma_joinid": pa.array(unit.cells, pa.int64()),
                "step": pa.array(unit.steps, pa.int64()),
                "tokens": _list(out, flat_t[idx].astype(np.int32)),
                "values": _list(out, flat_v[idx].astype(np.float32)),
            }
        )


def flat_mask(offsets: np.ndarray, joinids: np.ndarray, *, ratio: float, seed: int, epoch: int) -> np.ndarray:
    """uint8 [M]: masked tokens of ragged cells; round(ratio × genes) per cell (≥ 1 if ratio > 0 and genes > 0),
    never CLS. A pure function of (seed, epoch, soma_joinid, position): batching, rank and engine do not matter."""
    from scfm_data_service.shuffle import splitmix64

    lens = np.diff(offsets)
    m = int(offsets[-1] - offsets[0])
    mask = np.zeros(m, dtype=np.uint8)
    if ratio <= 0 or m == 0:
        return mask
    rows = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    pos = np.arange(m, dtype=np.int64) - (offsets[:-1] - offsets[0])[rows]
    key = splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ splitmix64(np.uint64(epoch & 0xFFFFFFFF)))
    cell = splitmix64(np.asarray(joinids, dtype=np.int64).view(np.uint64) ^ key)
    u = splitmix64(cell[rows] ^ pos.astype(np.uint64)) >> np.uint64(40)  # 24 random bits
    u[pos == 0] = (1 << 24) - 1 + 1  # CLS sorts last
    order = np.argsort((rows.astype(np.uint64) << np.uint64(25)) | u, kind="stable")
    n_genes = lens - 1
    k = np.where(n_genes > 0, np.maximum(1, np.rint(ratio * n_genes)), 0).astype(np.int64)
    rank = np.arange(m, dtype=np.int64) - (offsets[:-1] - offsets[0])[rows]  # rows[order] == rows
    mask[order[rank < k[rows]]] = 1
    return mask


class Tokenizer:
    """map_batches callable: raw-count (or token) table → token table with the flat `mask` column."""

    def __init__(self, kind: str | None, max_len: int, n_bins: int, gene_median, mask: tuple[float, int, int]):
        self.kind, self.max_len, self.n_bins, self.gene_median = kind, max_len, n_bins, gene_median
        self.mask_ratio, self.seed, self.epoch = mask

    def __call__(self, tbl: pa.Table) -> pa.Table:
        if "tokens" in tbl.column_names:
            off, tok = _csr(tbl["tokens"])
            _, val = _csr(tbl["values"])
        else:
            indptr, genes = _csr(tbl["genes"])
            _, counts = _csr(tbl["counts"])
            off, tok, val = tokenize(
                indptr,
                genes,
                counts,
                kind=self.kind,
                max_len=self.max_len,
                n_bins=self.n_bins,
                gene_median=self.gene_median,
            )
        joinids = tbl["soma_joinid"].to_numpy()
        mask = flat_mask(off, joinids, ratio=self.mask_ratio, seed=self.seed, epoch=self.epoch)
        return pa.table(
            {
                "soma_joinid": tbl["soma_joinid"],
                "step": tbl["step"],
                "tokens": _list(off, tok),
                "values": _list(off, val),
                "mask": _list(off, mask),
            }
        )


def _plan_datasource_cls():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PlanDatasource(Datasource):
        """Ray Data Datasource: one read task per read unit (runs of steps over soma_joinid sets), in order."""

        def __init__(self, units: list[Unit], reader: AtlasReader | ZarrReader):
            self.units, self.reader = units, reader

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
            reader = self.reader

            def make(unit: Unit):
                return lambda: [reader.read(unit)]

            return [
                ReadTask(make(u), BlockMetadata(num_rows=len(u.cells), size_bytes=None, exec_stats=None))
                for u in self.units
            ]

    return PlanDatasource


def plan_datasource(units: list[Unit], reader: AtlasReader | ZarrReader):
    """A Ray Data Datasource over the given read units (imports Ray only when called)."""
    return _plan_datasource_cls()(units, reader)
