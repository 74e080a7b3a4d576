"""`launch compare`: a table of the params that differ between MLflow runs and their final metrics, plus a PNG of
their loss / val_loss / grad_norm curves overlaid."""

from __future__ import annotations

import argparse

from scfm_launch.commands._common import subparser

HELP = "compare MLflow runs: differing params, final metrics, overlaid loss/grad-norm curves"
EXAMPLES = """  launch compare --experiment ablation-sigmoid-vs-softmax
  launch compare --runs 3f2a9c1e 8b7d0e44 --metric val_loss --out compare.png
  launch compare --experiment stress-8k --metric grad_norm --tracking-uri http://127.0.0.1:5000
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "compare", HELP, EXAMPLES)
    p.add_argument("--experiment", metavar="NAME", help="compare every run of this MLflow experiment (default: scfm)")
    p.add_argument("--runs", nargs="+", default=[], metavar="ID", help="compare these run ids instead")
    p.add_argument("--metric", default="val_loss", help="metric listed first in the table (default: val_loss)")
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local store of `launch run`)",
    )
    p.add_argument("--out", default="compare.png", metavar="PNG", help="curve overlay figure (default: compare.png)")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from scfm_launch.errors import UsageError
    from scfm_platform.eval.compare import compare_runs

    if args.runs and args.experiment:
        raise UsageError("give --experiment NAME or --runs ID ..., not both")
    cmp = compare_runs(
        experiment=args.experiment,
        run_ids=args.runs,
        metric=args.metric,
        out=None if args.no_plot else args.out,
        tracking_uri=args.tracking_uri,
    )
    console = Console()
    console.print(cmp.table)
    console.print(f"tracking: {cmp.tracking_uri}")
    if cmp.png is not None:
        console.print(f"curves: {cmp.png}")
    elif not args.no_plot:
        console.print("curves: none of loss / val_loss / grad_norm were logged by these runs; no figure written")
    return 0
