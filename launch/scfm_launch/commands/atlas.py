"""`launch atlas`: build and inspect the TileDB-SOMA atlas (ingest, info, demo) and its zarr token cache."""

from __future__ import annotations

import argparse

from scfm_launch.commands._common import subparser

HELP = "build and inspect a cell atlas (ingest, info, demo, tokenize)"
EXAMPLES = """  launch atlas demo atlas/ --synthetic-cells 20000
  launch atlas ingest atlas/ donor1.h5ad donor2.h5ad --use-raw
  launch atlas info atlas/
  launch atlas tokenize atlas/ --out tokens.zarr --tokenizer binned --max-len 2048
"""
DEFAULT_SYNTHETIC = 5000


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "atlas", HELP, EXAMPLES)
    p.set_defaults(func=lambda args: _usage(p))
    acts = p.add_subparsers(dest="atlas_command", metavar="ACTION", title="actions")

    s = subparser(
        acts,
        "ingest",
        "add .h5ad files to an atlas (created if absent), one dataset per file",
        "  launch atlas ingest atlas/ pbmc.h5ad lung.h5ad\n"
        "  launch atlas ingest s3://bucket/atlas donor.h5ad --use-raw\n",
    )
    s.add_argument("atlas", metavar="ATLAS", help="atlas URI (local directory or object-store URI)")
    s.add_argument("files", metavar="FILE.h5ad", nargs="+", help="AnnData files; dataset_id = file name stem")
    s.add_argument("--use-raw", action="store_true", help="take raw counts from .raw.X instead of .X")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=ingest)

    s = subparser(
        acts,
        "info",
        "datasets, cells, genes, non-zeros and cell types of an atlas",
        "  launch atlas info atlas/\n  launch atlas info atlas/ --json\n",
    )
    s.add_argument("atlas", metavar="ATLAS", help="atlas URI")
    s.add_argument("--json", action="store_true", help="print JSON instead of tables")
    s.set_defaults(func=info)

    s = subparser(
        acts,
        "demo",
        "create a ready atlas: scanpy's labelled PBMC cells plus synthetic cells (no download)",
        "  launch atlas demo atlas/\n  launch atlas demo big_atlas/ --synthetic-cells 200000\n",
    )
    s.add_argument("atlas", metavar="ATLAS", help="atlas URI to create (must not exist)")
    s.add_argument(
        "--synthetic-cells",
        type=int,
        default=DEFAULT_SYNTHETIC,
        metavar="N",
        help=f"synthetic cells to add (default {DEFAULT_SYNTHETIC})",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the synthetic generator")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=demo)

    s = subparser(
        acts,
        "tokenize",
        "pre-tokenize every cell into a zarr v3 token cache the stream can read (data.tokens)",
        "  launch atlas tokenize atlas/ --out tokens.zarr\n"
        "  launch atlas tokenize atlas/ --out tokens_binned.zarr --tokenizer binned --n-bins 51\n",
    )
    s.add_argument("atlas", metavar="ATLAS", help="atlas URI")
    s.add_argument("--out", required=True, metavar="TOKENS.zarr", help="zarr store to write (replaced)")
    s.add_argument("--tokenizer", choices=("rank", "binned"), default="rank", help="default rank")
    s.add_argument("--max-len", type=int, default=2048, help="tokens per cell, CLS included (default 2048)")
    s.add_argument("--n-bins", type=int, default=51, help="bins of the binned tokenizer (default 51)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=tokenize)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def ingest(args: argparse.Namespace) -> int:
    from scfm_data_service import ingest as do_ingest

    ids = do_ingest(args.atlas, args.files, use_raw=args.use_raw, progress=not args.quiet)
    print(f"ingested {len(ids)} dataset(s) into {args.atlas}: {', '.join(ids)}")
    return 0


def info(args: argparse.Namespace) -> int:
    import json

    from scfm_data_service import atlas_info

    d = atlas_info(args.atlas)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not con.is_terminal:  # pipes and files get whole lines
        con.width = 200
    con.print(f"[bold]{d['uri']}[/]: {d['cells']:,} cells, {d['genes']:,} genes, {d['nnz']:,} non-zeros")
    t = Table("dataset", "cells", "non-zeros", "genes/cell", "cell types (top 5)")
    for ds in d["datasets"]:
        top = sorted(ds["cell_types"].items(), key=lambda kv: -kv[1])[:5]
        t.add_row(
            ds["dataset_id"],
            f"{ds['cells']:,}",
            f"{ds['nnz']:,}",
            f"{ds['nnz'] / max(ds['cells'], 1):,.0f}",
            ", ".join(f"{k} ({v})" for k, v in top) + (" …" if len(ds["cell_types"]) > 5 else ""),
        )
    con.print(t)
    return 0


def demo(args: argparse.Namespace) -> int:
    from scfm_data_service import build_demo_atlas

    build_demo_atlas(args.atlas, args.synthetic_cells, progress=not args.quiet, seed=args.seed)
    print(f"demo atlas ready at {args.atlas}: 700 PBMC cells + {args.synthetic_cells} synthetic cells")
    return 0


def tokenize(args: argparse.Namespace) -> int:
    from scfm_data_service import DataConfig, write_token_cache

    cfg = DataConfig(atlas=args.atlas, tokenizer=args.tokenizer, max_len=args.max_len, n_bins=args.n_bins)
    attrs = write_token_cache(cfg, args.out, progress=not args.quiet)
    print(
        f"wrote {attrs['n_cells']:,} cells, {attrs['n_tokens']:,} tokens ({args.tokenizer}, max_len "
        f"{args.max_len}) to {args.out}; use data.tokens={args.out}"
    )
    return 0
