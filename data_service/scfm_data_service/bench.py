"""Benchmark: the scfm stream vs tiledbsoma-ml's ExperimentDataset on the same synthetic atlas, same run.

    python -m scfm_data_service.bench [--atlas DIR] [--cells 200000] [--batch-size 64] [--measure-cells 131072]
                                      [--tokens TOKENS.zarr] [--read-workers N]

Both read the same atlas with shuffling on and the same cells per batch: the scfm stream (Ray Data pipeline,
engine=ray, rank 0 of 1) with max_cells_per_batch = batch size and a token budget that never binds, tiledbsoma-ml
with batch_size = batch size. Reported: cells/s and tokens/s (non-padded tokens for scfm; expressed genes for
tiledbsoma-ml) over the batches after the first, plus first-batch latency and cells/s including start-up; and
cells/s over one whole epoch including start-up. The first figures leave out what a loader reads before its first
batch (tiledbsoma-ml: a whole 65 536-cell I/O batch, half the reads of the timed window; scfm: its first read
tasks), the epoch figure leaves out nothing.
tiledbsoma-ml runs before and after the scfm stream (atlas and zarr token-cache paths) so load changes hit both;
a last row adds what a consumer needs on top of tiledbsoma-ml (scfm tokenize, masks, padding of its dense rows).
Also the padding fraction of length-bucketed vs unbucketed batches under the default token budget.
tiledbsoma-ml is a bench-only dependency.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from scfm_data_service.bucketing import padding_fraction
from scfm_data_service.config import DataConfig


def _time(make_it, measure_cells: int, count_tokens) -> dict:
    """Time a loader from iterator creation: first-batch latency, cells/s and tokens/s over the batches after the
    first until measure_cells cells, cells/s over those including start-up, and cells/s over the whole epoch
    including start-up (the loader runs to its end: every read is on the clock, none is done before it starts)."""
    t_start = time.perf_counter()
    it = make_it()
    n0, _ = count_tokens(next(it))
    t0 = time.perf_counter()
    cells = tokens = 0
    t1 = None
    for b in it:
        n, k = count_tokens(b)
        cells += n
        if t1 is None:
            tokens += k
            if cells >= measure_cells:
                t1, window = time.perf_counter(), cells
    t_end = time.perf_counter()
    if t1 is None:
        t1, window = t_end, cells
    return {
        "first_batch_s": t0 - t_start,
        "cells_per_s": window / (t1 - t0),
        "tokens_per_s": tokens / (t1 - t0),
        "cells_per_s_incl_start": (window + n0) / (t1 - t_start),
        "epoch_cells_per_s": (cells + n0) / (t_end - t_start),
        "cells": cells + n0,
    }


def bench_scfm(cfg: DataConfig, measure_cells: int) -> dict:
    from scfm_data_service.stream import iter_batches

    return _time(
        lambda: iter_batches(cfg, rank=0, world_size=1, epoch=0),
        measure_cells,
        lambda b: (len(b["seq_lens"]), int(b["seq_lens"].sum())),
    )


def _ml_iter(uri: str, batch_size: int, transform=None):
    import tiledbsoma as soma
    import tiledbsoma_ml

    with soma.Experiment.open(uri) as exp, exp.axis_query("RNA") as q:
        ds = tiledbsoma_ml.ExperimentDataset(q, layer_name="raw", batch_size=batch_size, shuffle=True, seed=0)
        for b in ds:
            yield transform(b) if transform else b


def bench_tiledbsoma_ml(uri: str, batch_size: int, measure_cells: int) -> dict:
    """tiledbsoma-ml as it is: dense float32 [B, n_genes] rows plus obs; tokens = expressed genes."""
    return _time(
        lambda: _ml_iter(uri, batch_size), measure_cells, lambda b: (b[0].shape[0], int(np.count_nonzero(b[0])))
    )


def bench_tiledbsoma_ml_tokenized(cfg: DataConfig, batch_size: int, measure_cells: int) -> dict:
    """tiledbsoma-ml plus what a consumer needs on top to get scfm's batches: its dense rows → CSR → the scfm rank
    tokenizer, masks and [B, T] padding (one step per batch, no length bucketing)."""
    from scfm_data_service.atlas import read_meta
    from scfm_data_service.datasource import flat_mask, pad_steps
    from scfm_data_service.tokenize import tokenize

    median = read_meta(cfg.atlas)["gene_median"]

    def transform(b):
        x, obs = b
        rows, genes = np.nonzero(x)
        indptr = np.zeros(x.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=x.shape[0]), out=indptr[1:])
        off, tok, val = tokenize(indptr, genes, x[rows, genes], kind="rank", max_len=cfg.max_len, gene_median=median)
        mask = flat_mask(off, obs["soma_joinid"].to_numpy(), ratio=cfg.mask_ratio, seed=cfg.seed, epoch=0)
        _, _, arrays = pad_steps(np.array([0, x.shape[0]]), off, tok, val, mask)
        return np.diff(off), arrays

    return _time(
        lambda: _ml_iter(cfg.atlas, batch_size, transform), measure_cells, lambda b: (len(b[0]), int(b[0].sum()))
    )


def padding_report(cfg: DataConfig) -> tuple[float, float]:
    """(bucketed, unbucketed) padded-token fraction of one epoch under cfg's token budget."""
    from scfm_data_service.shuffle import block_permutation
    from scfm_data_service.stream import _cells, epoch_plan

    plan = epoch_plan(cfg, epoch=0, world_size=1)
    bucketed = padding_fraction([plan.lengths[a:b] for a, b in zip(plan.offsets[:-1], plan.offsets[1:], strict=True)])
    cells = _cells(cfg)
    lengths = cells.lengths[block_permutation(len(cells.lengths), cfg.shuffle_block_cells, cfg.seed, 0)]
    batches, cur, longest = [], [], 0
    for n in lengths:  # same order, same budget, no buckets: greedy fill
        if (cur and (len(cur) + 1) * max(longest, n) > cfg.tokens_per_batch) or len(cur) == cfg.max_cells_per_batch:
            batches.append(np.asarray(cur))
            cur, longest = [], 0
        cur.append(n)
        longest = max(longest, n)
    batches.append(np.asarray(cur))
    return bucketed, padding_fraction(batches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scfm_data_service.bench", description=__doc__.splitlines()[0])
    p.add_argument("--atlas", default="bench_atlas", help="synthetic atlas (built here if absent)")
    p.add_argument("--cells", type=int, default=200_000, help="synthetic cells when building the atlas")
    p.add_argument("--batch-size", type=int, default=64, help="cells per batch for both loaders")
    p.add_argument("--measure-cells", type=int, default=131_072, help="cells timed per loader (2 tiledbsoma-ml reads)")
    p.add_argument("--tokens", default=None, help="zarr token cache (built here if absent); default ATLAS.tokens.zarr")
    p.add_argument("--read-workers", type=int, default=None, help="data.read_workers of the scfm stream (default 2)")
    args = p.parse_args(argv)
    try:  # checked before anything is built: the atlas alone takes minutes
        import tiledbsoma_ml  # noqa: F401
    except ImportError:
        p.error("needs tiledbsoma-ml, the loader it compares against: pip install -e '.[bench]'")

    from scfm_data_service.atlas import atlas_info
    from scfm_data_service.cache import write_token_cache
    from scfm_data_service.demo import build_demo_atlas

    if not Path(args.atlas).exists():
        t = time.perf_counter()
        build_demo_atlas(args.atlas, args.cells, include_pbmc=False, progress=True)
        print(f"built atlas in {time.perf_counter() - t:.0f} s")
    info = atlas_info(args.atlas)
    max_len = 2048
    cfg = DataConfig(
        atlas=args.atlas,
        max_len=max_len,
        max_cells_per_batch=args.batch_size,
        tokens_per_batch=args.batch_size * max_len,
        engine="ray",
    )
    if args.read_workers is not None:
        cfg = replace(cfg, read_workers=args.read_workers)
    tokens = args.tokens or f"{args.atlas.rstrip('/')}.tokens.zarr"
    if not Path(tokens).exists():
        t = time.perf_counter()
        write_token_cache(cfg, tokens)
        print(f"built token cache in {time.perf_counter() - t:.0f} s")
    import ray

    load0 = os.getloadavg()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    m, bs = args.measure_cells, args.batch_size
    rows = [
        ("tiledbsoma-ml ExperimentDataset (run 1)", bench_tiledbsoma_ml(args.atlas, bs, m)),
        ("scfm stream, atlas (Ray Data)", bench_scfm(cfg, m)),
        ("scfm stream, zarr token cache (Ray Data)", bench_scfm(replace(cfg, tokens=tokens), m)),
        ("tiledbsoma-ml ExperimentDataset (run 2)", bench_tiledbsoma_ml(args.atlas, bs, m)),
        ("tiledbsoma-ml + scfm tokenize/mask/pad in the consumer", bench_tiledbsoma_ml_tokenized(cfg, bs, m)),
    ]
    ray.shutdown()
    load1 = os.getloadavg()
    bucketed, unbucketed = padding_report(DataConfig(atlas=args.atlas))
    base = (rows[0][1]["cells_per_s"] + rows[3][1]["cells_per_s"]) / 2
    base_epoch = (rows[0][1]["epoch_cells_per_s"] + rows[3][1]["epoch_cells_per_s"]) / 2
    print(
        f"atlas: {info['cells']:,} cells, {info['genes']:,} genes, {info['nnz'] / info['cells']:,.0f} genes/cell; "
        f"{os.cpu_count()} CPUs, load average {load0[0]:.1f} before / {load1[0]:.1f} after; batch size {bs} cells; "
        f"shuffle on; scfm read_workers {cfg.read_workers}; {m:,} cells timed per loader after its first batch\n"
    )
    print(
        "| loader | delivers | first batch (s) | cells/s | tokens/s | cells/s incl. start | vs tiledbsoma-ml | "
        "epoch cells/s incl. start | epoch vs tiledbsoma-ml |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for name, r in rows:
        what = "tokenized, padded, masked [B, T] tensors" if "scfm" in name else "dense [B, n_genes] X + obs"
        print(
            f"| {name} | {what} | {r['first_batch_s']:.1f} | {r['cells_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['cells_per_s_incl_start']:,.0f} | {r['cells_per_s'] / base:.2f}× | "
            f"{r['epoch_cells_per_s']:,.0f} ({r['cells']:,} cells) | {r['epoch_cells_per_s'] / base_epoch:.2f}× |"
        )
    print(
        f"\npadded tokens / batch tokens (tokens_per_batch=16384, max_len=2048): bucketed {bucketed:.1%}, "
        f"unbucketed {unbucketed:.1%}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
