"""`launch run`: train from a run config on this machine's Ray (or the cluster at $RAY_ADDRESS)."""

from __future__ import annotations

import argparse

from scfm_launch.commands._common import add_config_args, load_run_config, subparser

HELP = "train a model from a run config (local Ray, or the Ray cluster at $RAY_ADDRESS)"
EXAMPLES = """  launch run configs/demo.yaml
  launch run configs/demo.yaml model.attention=softmax train.steps=60
  launch run configs/demo.yaml --resume                  # continue the newest run of this config's name
  RAY_ADDRESS=auto launch run configs/h200_160m_8k.yaml  # inside a Ray cluster (KubeRay, Ray Jobs)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "run", HELP, EXAMPLES)
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the newest run of this name from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--worker-logs", action="store_true", help="show the training workers' output (local Ray)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args)
    from scfm_platform.trainer import train

    result = train(cfg, resume=args.resume, progress=not args.no_progress, worker_logs=args.worker_logs)
    m = result.metrics
    summary = f"step {m.get('step', '?')}"
    for key in ("loss", "val_loss", "tokens_per_s", "mfu"):
        if isinstance(m.get(key), float):
            summary += f"  {key} {m[key]:.4g}"
    print(f"run {result.mlflow_run_name} ({result.mlflow_run_id}): {summary}")
    print(f"checkpoints: {result.run_dir}")
    if result.interrupted:
        import signal

        name = signal.Signals(result.interrupted).name
        print(f"interrupted by {name}: checkpoint {result.checkpoint}; continue with `launch run ... --resume`")
        return 128 + result.interrupted  # 130 for SIGINT, 143 for SIGTERM
    if result.stop_reason:
        print(f"stopped: {result.stop_reason}; last good checkpoint: {result.checkpoint}")
        return 1
    return 0
