"""Reading planned cells: from the atlas (raw counts, tokenized in the read task) or from the zarr token cache.

A read unit is a run of consecutive steps of one rank: its cells (in plan order) and their step numbers. Reading
a unit yields one Arrow table with one row per step (so Ray Data can only split blocks between steps):

    atlas:  step int64, soma_joinid list<int64>, genes list<list<int32>>, counts list<list<float32>>
    tokens: step int64, soma_joinid list<int64>, tokens list<list<int32>>, values list<list<float32>>
            (values absent for a rank cache: its values are all 0)

`Tokenizer` (called in the read task, after the read) tokenizes a whole unit at once, draws the masks and pads
every step into its [B, T] arrays, flattened:

    batches: step int64, t int64, soma_joinid list<int64>, seq_lens list<int32>, gene_ids list<int32>,
             values list<float32>, mask list<uint8>, target_gene_ids list<int32>, target_values list<float32>
             (values and target_values absent when all 0, as with the rank tokenizer)

so the consumer only views the buffers and widens the ids to int64. `PlanDatasource` is the Ray Data Datasource
with one read task per unit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from scfm_data_service.errors import DataError
from scfm_data_service.schema import MASK_ID, PAD_ID
from scfm_data_service.tokenize import token_chunks, tokenize

_OPEN: dict[tuple, object] = {}  # per-process cache of opened arrays (Ray workers are reused across tasks)
_READS: list[tuple[str, int, int]] | None = None  # set by record_reads


@contextmanager
def record_reads() -> Iterator[list[tuple[str, int, int]]]:
    """Collect every read the readers of this process issue while inside: (kind, first soma_joinid, rows), kind
    "range" (rows = the joinid span read) or "points" (rows = joinids asked). For tests and profiling; reads in
    Ray workers are not seen (use engine="local")."""
    global _READS
    outer, _READS = _READS, []
    try:
        yield _READS
    finally:
        _READS = outer


def _log_read(kind: str, first: int, rows: int) -> None:
    if _READS is not None:
        _READS.append((kind, first, rows))


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


def _nested(step_off: np.ndarray, cell_off: np.ndarray, values: np.ndarray) -> pa.Array:
    """list<list<values>>: step i holds cells step_off[i]:step_off[i+1], cell j values cell_off[j]:cell_off[j+1]."""
    return pa.LargeListArray.from_arrays(pa.array(step_off, pa.int64()), _list(cell_off, values))


def _csr(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    off = arr.offsets.to_numpy().astype(np.int64)
    flat = arr.values.to_numpy(zero_copy_only=False)
    return off - off[0], flat[off[0] : off[-1]]


def _csr2(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step offsets into cells, cell offsets into values, values) of a list<list<…>> column, rebased to 0."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    s_off = arr.offsets.to_numpy().astype(np.int64)
    inner = arr.values
    c_off = inner.offsets.to_numpy().astype(np.int64)[s_off[0] : s_off[-1] + 1]
    flat = inner.values.to_numpy(zero_copy_only=False)[c_off[0] : c_off[-1]]
    return s_off - s_off[0], c_off - c_off[0], flat


def _step_offsets(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct steps, offsets of their runs) of a non-decreasing step array."""
    brk = np.flatnonzero(np.diff(steps)) + 1
    return steps[np.append(0, brk)] if len(steps) else steps, np.concatenate([[0], brk, [len(steps)]])


def _step_table(
    unit: Unit, cell_off: np.ndarray, names: tuple[str, str], a: np.ndarray, b: np.ndarray | None
) -> pa.Table:
    """Step table of a unit's cells; b=None leaves the second column out (all-zero token values)."""
    steps, s_off = _step_offsets(unit.steps)
    cols = {"step": pa.array(steps, pa.int64()), "soma_joinid": _list(s_off, unit.cells.astype(np.int64))}
    cols[names[0]] = _nested(s_off, cell_off, a)
    if b is not None:
        cols[names[1]] = _nested(s_off, cell_off, b)
    return pa.table(cols)


_MAX_RANGE_READS = 8  # a few small runs are read as ranges; more go in one point read (each query costs ~50 ms)


_MAX_SEGMENTS = 256  # more row-sorted segments than this in one read: sort by row first


def _scatter(local, g, c, base, n_ids, genes, counts) -> None:
    """genes/counts[base[row] + rank of the entry within its row] = g/c, for entries in a few row-sorted segments."""
    brk = np.flatnonzero(np.diff(local) < 0) + 1
    if len(brk) > _MAX_SEGMENTS:
        order = np.argsort(local.astype(np.uint16 if n_ids <= 1 << 16 else np.int64), kind="stable")
        local, g, c, brk = local[order], g[order], c[order], brk[:0]
    seen = np.zeros(n_ids, dtype=np.int64)
    for a, b in zip(np.r_[0, brk].tolist(), np.r_[brk, len(local)].tolist(), strict=True):
        ls = local[a:b]
        cnt = np.bincount(ls, minlength=n_ids)
        run_start = np.cumsum(cnt) - cnt  # within this segment
        dest = base[ls] + seen[ls] - run_start[ls]
        dest += np.arange(b - a, dtype=np.int64)
        genes[dest] = g[a:b]
        counts[dest] = c[a:b]
        seen += cnt


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

    def _read(self, coords) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if isinstance(coords, slice):
            _log_read("range", coords.start, coords.stop - coords.start + 1)
        else:
            _log_read("points", int(coords[0]), len(coords))
        tbl = self._x().read(coords=(coords,), result_order="auto").tables().concat()
        return (
            tbl["soma_dim_0"].to_numpy(),
            tbl["soma_dim_1"].to_numpy().astype(np.int32),
            tbl["soma_data"].to_numpy().astype(np.float32, copy=False),
        )

    def read_csr(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr int64 [n+1], genes int32 [nnz], counts float32 [nnz]) of `cells` (distinct), in that order.

        Runs of joinids (gaps ≤ 64) are read as ranges; only when a unit has very many small runs are those read
        as one point read (TileDB point reads over many fragments are slow). Reads are unordered (several times
        faster than row-major) and come back as a few row-sorted segments: every entry is scattered straight to
        its place in the output (its cell's start in plan order + its rank within the cell), no sort or gather."""
        uniq, first = np.unique(cells, return_index=True)
        if len(uniq) != len(cells):
            raise DataError(f"read_csr got {len(cells) - len(uniq)} repeated soma_joinids; cells must be distinct")
        runs = np.split(uniq, np.flatnonzero(np.diff(uniq) > 64) + 1)
        small = [r for r in runs if len(r) < 256]
        few = len(small) <= _MAX_RANGE_READS
        parts = [(r, slice(int(r[0]), int(r[-1]))) for r in runs if len(r) >= 256 or few]
        if small and not few:
            pts = np.concatenate(small)
            parts.append((pts, pts))
        reads, len_u = [], np.zeros(len(uniq), dtype=np.int64)
        for need, coords in parts:
            rows, g, c = self._read(coords)
            if isinstance(coords, slice):
                n_ids, local, pos = coords.stop - coords.start + 1, rows - coords.start, need - coords.start
            else:
                n_ids, local, pos = len(need), np.searchsorted(need, rows), np.arange(len(need))
            cnt = np.bincount(local, minlength=n_ids)
            at = np.searchsorted(uniq, need)
            len_u[at] = cnt[pos]
            reads.append((local, g, c, n_ids, pos, at, cnt))
        out = np.zeros(len(cells) + 1, dtype=np.int64)
        np.cumsum(len_u[np.searchsorted(uniq, cells)], out=out[1:])
        total = int(out[-1])
        start_u = out[:-1][first]  # output start of each uniq cell (plan order)
        trash = max((int(r[6].max()) for r in reads if len(r[6])), default=0)  # rows read but not asked for
        genes = np.empty(total + trash, dtype=np.int32)
        counts = np.empty(total + trash, dtype=np.float32)
        for local, g, c, n_ids, pos, at, _ in reads:
            base = np.full(n_ids, total, dtype=np.int64)
            base[pos] = start_u[at]
            _scatter(local, g, c, base, n_ids, genes, counts)
        return out, genes[:total], counts[:total]

    def read(self, unit: Unit) -> pa.Table:
        out, genes, counts = self.read_csr(unit.cells)
        return _step_table(unit, out, ("genes", "counts"), genes, counts)


@dataclass(frozen=True)
class ZarrReader:
    """Pre-tokenized cells from the zarr token cache (row = soma_joinid)."""

    path: str

    def _arrays(self):
        key = ("zarr", self.path)
        if key not in _OPEN:
            import zarr

            root = zarr.open_group(self.path, mode="r")
            zero_values = root.attrs.get("tokenizer") == "rank"  # rank tokens' values are 0 by definition
            _OPEN[key] = (root["offsets"][:], root["tokens"], None if zero_values else root["values"])
        return _OPEN[key]

    def read(self, unit: Unit) -> pa.Table:
        offsets, tokens, values = self._arrays()
        uniq = np.unique(unit.cells)
        # contiguous runs of needed cells (gaps ≤ 64 cells are read through) → one slice each
        brk = np.flatnonzero(np.diff(uniq) > 64) + 1
        parts_t, parts_v, starts = [], [], []
        base = 0
        for run in np.split(uniq, brk):
            a, b = int(offsets[run[0]]), int(offsets[run[-1] + 1])
            _log_read("range", int(run[0]), int(run[-1] - run[0] + 1))
            parts_t.append(tokens[a:b])
            if values is not None:
                parts_v.append(values[a:b])
            starts.append(offsets[run] - a + base)
            base += b - a
        flat_t = np.concatenate(parts_t) if len(parts_t) > 1 else (parts_t[0] if parts_t else np.zeros(0, np.int32))
        flat_v = np.concatenate(parts_v) if len(parts_v) > 1 else (parts_v[0] if parts_v else None)
        start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        sel = np.searchsorted(uniq, unit.cells)
        lens = (offsets[uniq + 1] - offsets[uniq])[sel]
        out = np.zeros(len(sel) + 1, dtype=np.int64)
        np.cumsum(lens, out=out[1:])
        src = start[sel] - out[:-1]  # cell i's tokens: flat[src[i] + out[i] : src[i] + out[i + 1]]
        tok = np.empty(int(out[-1]), dtype=np.int32)
        val = None if flat_v is None else np.empty(int(out[-1]), dtype=np.float32)
        for a, b in token_chunks(out, len(sel)):  # gather in plan order, a cache-sized piece at a time
            lo, hi = int(out[a]), int(out[b])
            idx = np.repeat(src[a:b], lens[a:b])
            idx += np.arange(lo, hi, dtype=np.int64)
            np.take(flat_t, idx, out=tok[lo:hi])
            if val is not None:
                np.take(flat_v, idx, out=val[lo:hi])
        return _step_table(unit, out, ("tokens", "values"), tok, val)


_ROW_BITS, _U_BITS, _POS_BITS = 17, 30, 17  # candidate sort key: cell in the chunk | random draw | position
_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xFF51AFD7ED558CCD)


def _draws(cell_hash: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u, pos) uint64 [M]: each position's 30-bit draw (genes < 2^30 - 1, CLS = 2^30 - 1) and its position."""
    pos = np.arange(int(starts[-1] + lens[-1]), dtype=np.uint64)
    pos -= np.repeat(starts.astype(np.uint64), lens)
    with np.errstate(over="ignore"):
        h = pos * _M1
        h ^= np.repeat(cell_hash, lens)
        h ^= h >> np.uint64(33)
        h *= _M2
        h ^= h >> np.uint64(33)
    h >>= np.uint64(64 - _U_BITS)
    u_max = np.uint64((1 << _U_BITS) - 1)
    np.minimum(h, u_max - np.uint64(1), out=h)
    h[starts] = u_max
    return h, pos


def flat_mask(offsets: np.ndarray, joinids: np.ndarray, *, ratio: float, seed: int, epoch: int) -> np.ndarray:
    """uint8 [M]: masked tokens of ragged cells; round(ratio × genes) per cell (≥ 1 if ratio > 0 and genes > 0),
    never CLS. A pure function of (seed, epoch, soma_joinid, position): batching, rank and engine do not matter.

    Each position draws 30 hash bits u = fmix(splitmix(joinid ^ key(seed, epoch)) ^ position × φ); a cell masks
    its k gene positions of smallest (u, position). Only candidates below a per-cell threshold (k plus a wide
    margin, in expectation) are sorted, as packed keys (cell | u | position); a cell with fewer than k candidates
    takes all its genes as candidates, so the result is exact."""
    from scfm_data_service.shuffle import splitmix64

    offsets = np.asarray(offsets, dtype=np.int64)
    lens = np.diff(offsets)
    m = int(offsets[-1] - offsets[0])
    out = np.zeros(m, dtype=np.uint8)
    if ratio <= 0 or m == 0:
        return out
    if lens.max() > 1 << _POS_BITS:
        raise DataError(f"cells of {lens.max()} tokens exceed the mask's {1 << _POS_BITS}-position limit")
    if lens.min() < 1:
        raise DataError("flat_mask: every cell holds at least its CLS token (an offset step of 0 was given)")
    starts = offsets[:-1] - offsets[0]
    key = splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ splitmix64(np.uint64(epoch & 0xFFFFFFFF)))
    cell = splitmix64(np.asarray(joinids, dtype=np.int64).view(np.uint64) ^ key)
    n_genes = lens - 1
    k = np.where(n_genes > 0, np.maximum(1, np.rint(ratio * n_genes)), 0).astype(np.int64)
    # u < t holds for ~k + 6 sd + 16 of a cell's genes (u is uniform on [0, 2^30)); k = 0: no candidates
    t = np.where(k > 0, np.ceil((k + 6 * np.sqrt(k) + 16) / np.maximum(n_genes, 1) * (1 << _U_BITS)), 0)
    t = np.minimum(t, 1 << _U_BITS).astype(np.uint64)
    for a, b in token_chunks(offsets, 1 << _ROW_BITS):
        lo = int(starts[a])
        cs, ln, kk, tt = starts[a:b] - lo, lens[a:b], k[a:b], t[a:b].copy()
        u, pos = _draws(cell[a:b], cs, ln)
        for _ in range(2):  # the second pass only for cells with fewer than k candidates
            below = u < np.repeat(tt, ln)
            n_cand = np.add.reduceat(below.view(np.uint8), cs, dtype=np.int64)  # every cell has its CLS: ln ≥ 1
            short = n_cand < kk
            if not short.any():
                break
            tt[short] = np.uint64(1 << _U_BITS)  # every gene (u < 2^30 - 1 < 2^30; CLS = 2^30 - 1 stays out)
        cand = np.flatnonzero(below)
        cid = np.repeat(np.arange(b - a, dtype=np.int64), n_cand)
        ck = cid.astype(np.uint64) << np.uint64(_U_BITS + _POS_BITS)
        ck |= u[cand] << np.uint64(_POS_BITS)
        ck |= pos[cand]
        ck.sort()
        first = np.cumsum(n_cand) - n_cand
        take = ck[np.arange(len(ck)) - first[cid] < kk[cid]]  # sorted keys stay grouped by cell, in cid's order
        c_take = (take >> np.uint64(_U_BITS + _POS_BITS)).astype(np.int64)
        p_take = (take & np.uint64((1 << _POS_BITS) - 1)).astype(np.int64)
        out[lo + cs[c_take] + p_take] = 1
    return out


def pad_steps(
    s_off: np.ndarray, c_off: np.ndarray, tok: np.ndarray, val: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Pad ragged cells into one flat [B_s, T_s] array per step s (T_s = its longest cell), all steps concatenated.

    Returns (t int64 [S], flat offsets int64 [S+1], arrays): gene_ids (MASK_ID where masked), values (0 where masked),
    mask uint8, target_gene_ids, target_values; values and target_values are left out when every value is 0 (the
    rank tokenizer), which the consumer reads as zeros."""
    lens = np.diff(c_off)
    n_steps = len(s_off) - 1
    step_of = np.repeat(np.arange(n_steps), np.diff(s_off))
    t = np.zeros(n_steps, dtype=np.int64)
    if len(lens):
        np.maximum.at(t, step_of, lens)
    f_off = np.zeros(n_steps + 1, dtype=np.int64)
    np.cumsum(np.diff(s_off) * t, out=f_off[1:])
    cell_start = f_off[step_of] + (np.arange(len(lens)) - s_off[step_of]) * t[step_of]
    dest = np.repeat(cell_start - c_off[:-1], lens)
    dest += np.arange(len(tok), dtype=np.int64)
    total = int(f_off[-1])
    m = mask.view(np.bool_)
    out = {"mask": np.zeros(total, dtype=np.uint8)}
    out["mask"][dest] = mask
    out["target_gene_ids"] = np.full(total, PAD_ID, dtype=np.int32)
    out["target_gene_ids"][dest] = tok
    out["gene_ids"] = out["target_gene_ids"].copy()
    out["gene_ids"][out["mask"].view(np.bool_)] = MASK_ID
    if val.any():  # the rank tokenizer's values are all 0: no value arrays
        out["target_values"] = np.zeros(total, dtype=np.float32)
        out["values"] = np.zeros(total, dtype=np.float32)
        out["target_values"][dest] = val
        out["values"][dest] = np.where(m, np.float32(0), val)
    return t, f_off, out


PADDED = ("gene_ids", "values", "mask", "target_gene_ids", "target_values")


class Tokenizer:
    """Step table of raw counts (or tokens) → step table of padded, masked batches."""

    def __init__(self, kind: str | None, max_len: int, n_bins: int, gene_median, mask: tuple[float, int, int]):
        self.kind, self.max_len, self.n_bins, self.gene_median = kind, max_len, n_bins, gene_median
        self.mask_ratio, self.seed, self.epoch = mask

    def tokens(self, tbl: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(step offsets into cells, cell offsets into tokens, tokens int32, values float32) of a step table."""
        if "tokens" in tbl.column_names:
            s_off, off, tok = _csr2(tbl["tokens"])
            has_values = "values" in tbl.column_names  # absent: a rank cache, all values 0
            val = _csr2(tbl["values"])[2] if has_values else np.zeros(len(tok), dtype=np.float32)
            return s_off, off, tok, val
        s_off, indptr, genes = _csr2(tbl["genes"])
        _, _, counts = _csr2(tbl["counts"])
        off, tok, val = tokenize(
            indptr,
            genes,
            counts,
            kind=self.kind,
            max_len=self.max_len,
            n_bins=self.n_bins,
            gene_median=self.gene_median,
        )
        return s_off, off, tok, val

    def __call__(self, tbl: pa.Table) -> pa.Table:
        s_off, off, tok, val = self.tokens(tbl)
        j_off, joinids = _csr(tbl["soma_joinid"])
        mask = flat_mask(off, joinids, ratio=self.mask_ratio, seed=self.seed, epoch=self.epoch)
        t, f_off, arrays = pad_steps(s_off, off, tok, val, mask)
        cols = {
            "step": tbl["step"],
            "t": pa.array(t, pa.int64()),
            "soma_joinid": _list(j_off, joinids.astype(np.int64)),
            "seq_lens": _list(s_off, np.diff(off).astype(np.int32)),
        }
        cols.update({k: _list(f_off, arrays[k]) for k in PADDED if k in arrays})
        return pa.table(cols)


def _plan_datasource_cls():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PlanDatasource(Datasource):
        """Ray Data Datasource: one read task per read unit (runs of steps over soma_joinid sets), in order; with a
        tokenizer, each read task also tokenizes, masks and pads its unit."""

        def __init__(self, units: list[Unit], reader: AtlasReader | ZarrReader, tokenizer: Tokenizer | None):
            self.units, self.reader, self.tokenizer = units, reader, tokenizer

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
            reader, tokenizer = self.reader, self.tokenizer

            def make(unit: Unit):
                if tokenizer is None:
                    return lambda: [reader.read(unit)]
                return lambda: [tokenizer(reader.read(unit))]

            return [
                ReadTask(make(u), BlockMetadata(num_rows=len(u.cells), size_bytes=None, exec_stats=None))
                for u in self.units
            ]

    return PlanDatasource


def plan_datasource(units: list[Unit], reader: AtlasReader | ZarrReader, tokenizer: Tokenizer | None = None):
    """A Ray Data Datasource over the given read units (imports Ray only when called); with a tokenizer its read
    tasks yield padded step tables."""
    return _plan_datasource_cls()(units, reader, tokenizer)
