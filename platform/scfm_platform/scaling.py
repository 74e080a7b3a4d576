"""Scaling table: one `launch run` per (workers, ZeRO stage), metrics read back from MLflow, efficiency vs 1 worker.

    python -m scfm_platform.scaling configs/h200_160m_8k.yaml --workers 1,2,4 --zero 2,3 --steps 60 --warmup 10

Each cell of the table is `launch run CONFIG <overrides>` as a child process (its own Ray, or the cluster at
$RAY_ADDRESS), logging to one MLflow experiment (`tracking.uri`, else a local server under --out). Per run, over the
steps after --warmup: tokens/s (all workers and per worker), MFU, data-stall fraction (time the slowest rank waited
for its next batch), all as totals over totals (weighted by step time); peak memory is the maximum over ranks and
steps. Scaling efficiency = (tokens/s at N / N) / (tokens/s at B / B), B the fewest workers of that ZeRO stage (1).
A failed run is a row with its error; the others still run. --two-node starts two Ray nodes on this host (each
with half the CPUs and GPUs) and spreads the workers over them. Writes scaling.md, scaling.json and logs/ to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scfm_platform.config import load_config
from scfm_platform.errors import ConfigError, RunError
from scfm_platform.local_cluster import TwoNodeCluster, host_description

EXAMPLES = """examples:
  NCCL_NVLS_ENABLE=0 python -m scfm_platform.scaling configs/h200_160m_8k.yaml --workers 1,2,4 --zero 2,3 \\
      data.atlas=/data/atlas
  NCCL_NVLS_ENABLE=0 python -m scfm_platform.scaling configs/h200_160m_8k.yaml --workers 4 --zero 2 --two-node
  python -m scfm_platform.scaling configs/demo.yaml --workers 1,2 --zero 2 --steps 8 --warmup 2 \\
      data.atlas=synthetic:2000 resources.cpus_per_worker=0.5
"""
# Set by the script for every cell; change them with --workers, --zero, --steps and --out instead.
OWNED = ("resources.num_workers", "deepspeed.zero_stage", "tracking.experiment", "tracking.run_name", "train.steps")
# NVLink multicast stays off on shared GPU hosts (it can take the host's GPUs out of service); set where unset, so
# the Ray nodes and every run inherit it.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
METRICS = ("tokens_per_s", "tokens_per_s_per_worker", "cells_per_s", "mfu", "data_wait_frac", "step_time_s")


@dataclass
class Row:
    """One (workers, ZeRO stage) run and what MLflow has of it."""

    workers: int
    zero: int
    run_name: str
    command: str
    status: str = "ok"  # ok | failed | timeout | no metrics
    error: str | None = None
    run_id: str | None = None
    wall_s: float = 0.0
    steps: int = 0  # steps logged after the warm-up
    nodes: int | None = None
    worker_nodes: list[str] = field(default_factory=list)
    tokens_per_s: float | None = None
    tokens_per_s_per_worker: float | None = None
    cells_per_s: float | None = None
    mfu: float | None = None
    data_wait_frac: float | None = None
    step_time_s: float | None = None
    peak_mem_gib: float | None = None
    efficiency: float | None = None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        workers, zeros = _ints(args.workers, "--workers", None), _ints(args.zero, "--zero", (0, 1, 2, 3))
        if not 0 <= args.warmup < args.steps:
            raise ConfigError(f"--warmup={args.warmup} must be ≥ 0 and below --steps={args.steps}")
        owned = [o for o in args.overrides if o.partition("=")[0].strip() in OWNED]
        if owned:
            raise ConfigError(f"{owned[0]!r}: the script sets {', '.join(OWNED)}; use --workers/--zero/--steps")
        base = _base_overrides(args)
        cfg = load_config(args.config, [*base, f"resources.num_workers={max(workers)}"])  # fails here, not per run
        cluster = TwoNodeCluster(cpus=args.cpus, gpus=args.gpus) if args.two_node else None
    except (ConfigError, RunError) as e:
        print(f"scaling: error: {e}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = Path(args.out or f"runs/scaling/{cfg.name}-{stamp}").resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    base = [*base, f"train.output_dir={out / 'runs'}"]
    for key, value in NO_MULTICAST.items():
        os.environ.setdefault(key, value)
    env = dict(os.environ)
    meta: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "scfm_platform.scaling", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": host_description(),
        "config": args.config,
        "steps": args.steps,
        "warmup": args.warmup,
        "two_node": args.two_node,
    }
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        try:
            uri = cfg.tracking.uri or stack.enter_context(_local_mlflow(out / "mlflow"))
            if cluster is not None:
                stack.enter_context(cluster.logging_to(out / "logs"))
                env |= cluster.env()
                meta["cluster_address"], meta["cluster_nodes"] = cluster.address, cluster.nodes
                print(f"two Ray nodes on this host at {cluster.address}: {cluster.describe()}", flush=True)
        except RunError as e:  # no MLflow server or no cluster: no run can start
            print(f"scaling: error: {e}", file=sys.stderr)
            return 1
        for zero in zeros:
            for n in workers:
                row = run_cell(args, n, zero, [*base, f"tracking.uri={uri}"], out, env, stamp)
                rows.append(row)
                print(f"  {_row_line(row)}", flush=True)
    efficiency(rows)
    write(out, meta, rows)
    print_table(meta, rows)
    print(f"written: {out / 'scaling.md'}, {out / 'scaling.json'}; run logs in {out / 'logs'}")
    return 0 if all(r.status == "ok" for r in rows) else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scfm_platform.scaling",
        description=(__doc__ or "").split("\n\n")[0] + " Overrides (key=value) apply to every run.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="run config YAML (e.g. configs/h200_160m_8k.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    p.add_argument("--workers", default="1,2,4", help="worker (GPU) counts, comma-separated (default 1,2,4)")
    p.add_argument("--zero", default="2,3", help="ZeRO stages, comma-separated (default 2,3)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the means (default 10)")
    p.add_argument("--two-node", action="store_true", help="two Ray nodes on this host, workers spread over both")
    p.add_argument("--cpus", type=int, default=None, help="--two-node: CPUs to split over the nodes (default all)")
    p.add_argument("--gpus", type=int, default=None, help="--two-node: GPUs to split over the nodes (default all)")
    p.add_argument("--experiment", default="scaling", help="MLflow experiment (default scaling)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one run may take (default 1800)")
    p.add_argument("--out", default=None, help="output directory (default runs/scaling/<name>-<UTC time>)")
    return p


def _ints(text: str, flag: str, allowed: tuple[int, ...] | None) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(v >= 1 if allowed is None else v in allowed for v in values):
        want = "positive integers" if allowed is None else f"values from {', '.join(map(str, allowed))}"
        raise ConfigError(f"{flag}={text!r} must be comma-separated {want}, e.g. {flag} 1,2,4")
    return list(dict.fromkeys(values))


def _base_overrides(args: argparse.Namespace) -> list[str]:
    """Throughput runs: no validation, evaluation or mid-run checkpoints, no restarts; then the user's overrides."""
    fixed = [f"train.steps={args.steps}", "train.val_every=0", "eval.every=0", "train.checkpoint_every=0",
             "train.log_every=1", "resources.max_failures=0", f"tracking.experiment={args.experiment}"]  # fmt: skip
    if args.two_node:
        fixed.append("resources.placement_strategy=SPREAD")  # two workers on two nodes, not packed on one
    return [*fixed, *args.overrides]


def run_cell(args, workers: int, zero: int, base: list[str], out: Path, env: dict, stamp: str) -> Row:
    """`launch run` for one cell (a child process), then its metrics from MLflow; errors go into the row."""
    name = f"w{workers}-z{zero}{'-2node' if args.two_node else ''}"
    run_name = f"scaling-{name}-{stamp}"
    overrides = [*base, f"resources.num_workers={workers}", f"deepspeed.zero_stage={zero}",
                 f"tracking.run_name={run_name}"]  # fmt: skip
    cmd = [sys.executable, "-m", "scfm_launch", "run", args.config, *overrides, "--no-progress"]
    row = Row(workers, zero, run_name, shlex.join(["launch", *cmd[3:]]))
    log = out / "logs" / f"{name}.log"
    t0 = time.monotonic()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = None
        except KeyboardInterrupt:  # the child has its own session: Ctrl-C reaches only this process
            _stop(proc)
            raise
    row.wall_s = time.monotonic() - t0
    if rc != 0:
        row.status = "timeout" if rc is None else "failed"
        row.error = f"ran past --timeout={args.timeout:g}s" if rc is None else _last_error(log, rc)
    uri = next(o.partition("=")[2] for o in base if o.startswith("tracking.uri="))
    try:
        read_metrics(row, uri, args.experiment, args.warmup)
    except RunError as e:
        if row.status == "ok":
            row.status, row.error = "no metrics", str(e)
    return row


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (launch run checkpoints and exits), then SIGKILL of the child's own process group."""
    import signal

    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _last_error(log: Path, rc: int) -> str:
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    errors = [x for x in lines if "error" in x.lower()]
    last = (errors or lines or [f"exit {rc}"])[-1]
    return f"exit {rc}: {last[:300]}"


def read_metrics(row: Row, uri: str, experiment: str, warmup: int) -> None:
    """Fill `row` from its MLflow run (found by run name): totals over the steps after `warmup`, peak memory."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{row.run_name}'") if exp else []
    if not runs:
        raise RunError(f"no MLflow run named {row.run_name} in experiment '{experiment}' at {uri}")
    run = runs[0]
    row.run_id = run.info.run_id
    tags = run.data.tags
    row.worker_nodes = [x for x in tags.get("scfm.worker_nodes", "").split(",") if x]
    row.nodes = int(tags["scfm.nodes"]) if "scfm.nodes" in tags else None
    hist = {k: {m.step: m.value for m in client.get_metric_history(row.run_id, k)} for k in (*METRICS, "peak_mem_gib")}
    steps = sorted(s for s in hist["step_time_s"] if s > warmup)
    if not steps:
        raise RunError(f"run {row.run_name} logged no steps after the first {warmup} (warm-up)")
    row.steps = len(steps)
    dt = [hist["step_time_s"][s] for s in steps]
    total = sum(dt)
    for key in METRICS[:-1]:  # rates and fractions: Σ(value · step time) / Σ step time
        setattr(row, key, sum(hist[key].get(s, 0.0) * t for s, t in zip(steps, dt)) / total)
    row.step_time_s = total / len(steps)
    row.peak_mem_gib = max(hist["peak_mem_gib"].values(), default=None)


def efficiency(rows: list[Row]) -> None:
    """Per ZeRO stage: tokens/s per worker relative to the run with the fewest workers (1 when it ran)."""
    for zero in {r.zero for r in rows}:
        done = [r for r in rows if r.zero == zero and r.tokens_per_s]
        if not done:
            continue
        base = min(done, key=lambda r: r.workers)
        for r in done:
            r.efficiency = (r.tokens_per_s / r.workers) / (base.tokens_per_s / base.workers)


COLUMNS = ("workers", "ZeRO", "nodes", "tokens/s", "tokens/s/worker", "MFU", "scaling eff.", "data stall",
           "peak mem GiB", "step s", "status")  # fmt: skip


def _cells(r: Row) -> list[str]:
    def f(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    status = r.status if r.error is None else f"{r.status}: {r.error}"
    return [str(r.workers), str(r.zero), "—" if r.nodes is None else str(r.nodes), f(r.tokens_per_s, ",.0f"),
            f(r.tokens_per_s_per_worker, ",.0f"), f(r.mfu, ".1%"), f(r.efficiency, ".1%"), f(r.data_wait_frac, ".2%"),
            f(r.peak_mem_gib, ".2f"), f(r.step_time_s, ".3f"), status]  # fmt: skip


def _row_line(r: Row) -> str:
    return "  ".join(f"{c}={v}" for c, v in zip(COLUMNS, _cells(r))) + f"  ({r.wall_s:.0f} s)"


def to_markdown(meta: dict[str, Any], rows: list[Row]) -> str:
    """The table with its command, machine and date."""
    w, n = meta["warmup"], meta["steps"]
    head = [f"- command: `{meta['command']}`", f"- machine: {meta['machine']}", f"- date: {meta['date']}",
            f"- means over steps {w + 1}..{n} of each run (the first {w} are warm-up)"]  # fmt: skip
    if meta.get("cluster_nodes"):
        head.append(f"- two Ray nodes on one host: {', '.join(n['node_id'][:12] for n in meta['cluster_nodes'])}")
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    return "\n".join([*head, "", *table, ""])


def write(out: Path, meta: dict[str, Any], rows: list[Row]) -> None:
    (out / "scaling.md").write_text(to_markdown(meta, rows))
    (out / "scaling.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))


def print_table(meta: dict[str, Any], rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"scaling: {meta['config']}, {meta['steps']} steps ({meta['warmup']} warm-up)")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c == "status" else "right", overflow="fold")
    for r in rows:
        table.add_row(*_cells(r), style=None if r.status == "ok" else "red")
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # a log file gets whole rows


@contextlib.contextmanager
def _local_mlflow(root: Path):
    from scfm_platform.tracking import LocalServer

    server = LocalServer(root)
    url = server.start()
    print(f"MLflow: {url} (sqlite + artifacts under {root})", flush=True)
    try:
        yield url
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
