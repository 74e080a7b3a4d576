"""`make demo`: build the demo atlas, train a tiny sigmoid and a tiny softmax model on CPU, compare them.

    python -m scfm_launch.demo [--steps 120] [--cells 2000]

Both runs go through Ray Train + DeepSpeed (2 workers, ZeRO-2, gloo) from `configs/demo.yaml`, log to one local
MLflow server (sqlite under ./mlruns), which stays up afterwards so the UI can be opened; the demo prints its URL
and how to stop it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_CONFIG = Path("configs/demo.yaml")
CPU_NOTE = "on CPU sigmoid attention runs the eager reference (T×T scores); the Triton kernel needs a GPU"


def build_atlas(uri: str, cells: int) -> str:
    """The demo atlas at `uri` (built on first use); the synthetic stream if the data service cannot build one."""
    import scfm_data_service

    if not hasattr(scfm_data_service, "build_demo_atlas"):
        print("data service has no demo atlas builder here; training on the synthetic stream")
        return f"synthetic:{cells}"
    if not Path(uri).exists():
        print(f"building the demo atlas at {uri} ({cells} cells)…")
        scfm_data_service.build_demo_atlas(uri, synthetic_cells=cells)
    return uri


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scfm_launch.demo", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEMO_CONFIG), help="base run config")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per model (0: the config's)")
    p.add_argument("--cells", type=int, default=2000, help="cells in the demo atlas")
    args = p.parse_args(argv)

    import ray
    from rich.console import Console
    from rich.table import Table

    from scfm_platform.config import load_config
    from scfm_platform.tracking import LocalServer
    from scfm_platform.trainer import train

    console = Console()
    base = load_config(args.config)
    atlas = build_atlas(base.data.atlas, args.cells)
    ray.init(include_dashboard=False, log_to_driver=False)
    server = LocalServer(base.tracking.local_dir, base.tracking.local_port)
    url = server.start()
    console.print(f"MLflow UI: [bold]{url}[/bold]")
    results = {}
    try:
        for attention in ("sigmoid", "softmax"):
            overrides = [f"data.atlas={atlas}", f"model.attention={attention}", f"name=demo-{attention}"]
            overrides += [f"tracking.run_name=demo-{attention}"] + ([f"train.steps={args.steps}"] if args.steps else [])
            cfg = load_config(args.config, overrides)
            console.rule(f"{attention} attention: {cfg.model.preset} model, {cfg.train.steps} steps")
            t0 = time.monotonic()
            results[attention] = (train(cfg, tracking_uri=url, print_fn=console.print), time.monotonic() - t0)
    except BaseException:
        server.stop()
        raise
    finally:
        ray.shutdown()

    table = Table(title="demo: sigmoid vs softmax attention (tiny model, CPU)", caption=CPU_NOTE)
    for col in ("attention", "steps", "loss", "val loss", "tokens/s", "wall s", "MLflow run"):
        table.add_column(col)
    for attention, (r, wall) in results.items():
        val = [h["val_loss"] for h in r.history if "val_loss" in h]
        tok = [h["tokens_per_s"] for h in r.history if "tokens_per_s" in h]
        table.add_row(
            attention,
            str(r.history[-1].get("step", "?") if r.history else "?"),
            f"{r.history[-1].get('loss', float('nan')):.4f}" if r.history else "?",
            f"{val[-1]:.4f}" if val else "-",
            f"{sum(tok) / len(tok):,.0f}" if tok else "-",
            f"{wall:.0f}",
            f"{r.mlflow_run_name} ({r.mlflow_run_id[:8]})",
        )
    console.print(table)
    console.print(
        f"MLflow UI: [bold]{url}[/bold]  (server pid {server.proc.pid}; stop it with `kill {server.proc.pid}`)"
    )
    console.print("compare the runs: launch compare --experiment scfm --tracking-uri " + url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
