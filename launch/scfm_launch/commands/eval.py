"""`launch eval`: embed every cell of an atlas (or an .h5ad file) with a checkpoint's model, score cell-type
separation, plot a UMAP, and log the scores to the MLflow run that produced the checkpoint (or a new run tagged
with it). An .h5ad file is tokenized on the training atlas's gene vocabulary and gene medians."""

from __future__ import annotations

import argparse

from scfm_launch.commands._common import subparser

HELP = "embed cells with a checkpoint and score cell-type separation (ASW, kNN, Leiden NMI/ARI, UMAP)"
EXAMPLES = """  launch eval runs/demo/run-20260101-120000-000/checkpoint_00000050 --data atlases/demo
  launch eval runs/demo --data atlases/demo            (newest checkpoint of the newest run of job 'demo')
  launch eval runs/ablation-sigmoid/run-*/ --data /data/pbmc_atlas --label cell_type --out eval/sigmoid
  launch eval runs/ablation-sigmoid --data atlases/demo --datasets pbmc68k_reduced   (the labelled PBMC cells only)
  launch eval runs/demo --data new_donor.h5ad --label cell_type      (a file: tokenized on the training atlas's genes)
  launch eval runs/demo --data new_donor.h5ad --atlas /mnt/atlases/demo --use-raw   (training atlas moved; .raw.X)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "eval", HELP, EXAMPLES)
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="checkpoint directory written by `launch run` (runs/<name>/run-*/checkpoint_N), or a run directory "
        "(runs/<name>/run-*) or job directory (runs/<name>): its newest checkpoint",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="ATLAS|FILE.h5ad",
        help="SOMA atlas, or .h5ad file of raw counts, whose cells to embed and score (a file's genes are matched to "
        "the training atlas's vocabulary by gene id; genes it lacks are dropped)",
    )
    p.add_argument("--label", default="cell_type", help="obs column with the cell-type labels (default: cell_type)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: eval/<run>-<checkpoint>)")
    p.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow tracking URI (default: the one the checkpoint's run logged to)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the kNN graph, Leiden, UMAP and CV folds")
    p.add_argument(
        "--datasets",
        nargs="+",
        metavar="NAME",
        help="embed and score only the cells of these datasets (obs dataset_id; `launch atlas info` lists them)",
    )
    p.add_argument(
        "--atlas",
        metavar="ATLAS",
        help="with an .h5ad --data: the atlas the checkpoint trained on, whose gene vocabulary and medians tokenize "
        "the file (default: the run's data.atlas; give it when the atlas moved)",
    )
    p.add_argument(
        "--use-raw", action="store_true", help="with an .h5ad --data: take the counts from .raw.X instead of .X"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from scfm_platform.eval.evaluate import evaluate_checkpoint, scores_table
    from scfm_platform.inference import find_checkpoint

    ckpt = find_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else Path("eval") / f"{ckpt.parent.name}-{ckpt.name}"
    res = evaluate_checkpoint(
        ckpt,
        args.data,
        out_dir=out,
        label=args.label,
        tracking_uri=args.tracking_uri,
        seed=args.seed,
        datasets=args.datasets,
        atlas=args.atlas,
        use_raw=args.use_raw,
    )
    console = Console()
    console.print(scores_table(res.scores))
    console.print(f"embeddings: {res.zarr}  {res.h5ad}\numap: {res.umap_png}\nmlflow run: {res.run_id}")
    return 0
