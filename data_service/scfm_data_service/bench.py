"""Benchmark: the scfm stream vs tiledbsoma-ml's ExperimentDataset on the same synthetic atlas, same run.

    python -m scfm_data_service.bench [--atlas DIR] [--cells 200000] [--batch-size 64] [--measure-cells 60000]

Both read the same atlas with shuffling on and the same cells per batch: the scfm stream (Ray Data pipeline,
engine=ray, rank 0 of 1) with max_cells_per_batch = batch size and a token budget that never binds, tiledbsoma-ml
with batch_size = batch size. Reported: cells/s and tokens/s (non-padded tokens for scfm; expressed genes for
tiledbsoma-ml), measured after the first batch. Also the zarr token-cache path, and the padding fraction of
length-bucketed vs unbucketed batches under the default token budget. tiledbsoma-ml is a bench-only dependency.
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


def _time(it, measure_cells: int, count_tokens) -> tuple[float, float, int]:
    """(cells/s, tokens/s, cells) over batches after the first, until measure_cells cells."""
    first = next(it)
    del first
    t0, cells, tokens = time.perf_counter(), 0, 0
    for b in it:
        n, k = count_tokens(b)
        cells += n
        tokens += k
        if cells >= measure_cells:
            break
    dt = time.perf_counter() - t0
    return cells / dt, tokens / dt, cells


def bench_scfm(cfg: DataConfig, measure_cells: int) -> tuple[float, float, int]:
    from scfm_data_service.stream import iter_batches

    it = iter_batches(cfg, rank=0, world_size=1, epoch=0)
    return _time(it, measure_cells, lambda b: (len(b["seq_lens"]), int(b["seq_lens"].sum())))


def bench_tiledbsoma_ml(uri: str, batch_size: int, measure_cells: int) -> tuple[float, float, int]:
    import tiledbsoma as soma
    import tiledbsoma_ml

    with soma.Experiment.open(uri) as exp, exp.axis_query("RNA") as q:
        ds = tiledbsoma_ml.ExperimentDataset(q, layer_name="raw", batch_size=batch_size, shuffle=True, seed=0)
        it = iter(ds)
        return _time(it, measure_cells, lambda b: (b[0].shape[0], int(np.count_nonzero(b[0]))))


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
    p.add_argument("--measure-cells", type=int, default=60_000, help="cells timed per loader")
    p.add_argument("--tokens", default=None, help="zarr token cache (built here if absent); default ATLAS.tokens.zarr")
    args = p.parse_args(argv)

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
    tokens = args.tokens or f"{args.atlas.rstrip('/')}.tokens.zarr"
    if not Path(tokens).exists():
        write_token_cache(cfg, tokens)
    rows = []
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows.append(("scfm stream, atlas (Ray Data)", *bench_scfm(cfg, args.measure_cells)))
    rows.append(("scfm stream, zarr cache (Ray Data)", *bench_scfm(replace(cfg, tokens=tokens), args.measure_cells)))
    rows.append(
        ("tiledbsoma-ml ExperimentDataset", *bench_tiledbsoma_ml(args.atlas, args.batch_size, args.measure_cells))
    )
    ray.shutdown()
    bucketed, unbucketed = padding_report(DataConfig(atlas=args.atlas))
    base = rows[-1][1]
    print(
        f"atlas: {info['cells']:,} cells, {info['genes']:,} genes, {info['nnz'] / info['cells']:,.0f} genes/cell; "
        f"{os.cpu_count()} CPUs; batch size {args.batch_size} cells; shuffle on\n"
    )
    print("| loader | cells/s | tokens/s | vs tiledbsoma-ml |\n|---|---:|---:|---:|")
    for name, cps, tps, _ in rows:
        print(f"| {name} | {cps:,.0f} | {tps:,.0f} | {cps / base:.1f}× |")
    print(
        f"\npadded tokens / batch tokens (tokens_per_batch=16384, max_len=2048): bucketed {bucketed:.1%}, "
        f"unbucketed {unbucketed:.1%}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
