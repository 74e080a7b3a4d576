"""`launch compare`: the params that differ between MLflow runs, their final metrics, and their curves overlaid.

cmp = compare_runs(experiment="ablation", metric="val_loss", out="compare.png", tracking_uri=None)
rich.print(cmp.table)          # rows: differing params, then final metrics (`metric` first); one column per run
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scfm_platform.eval.plots import plot_curves
from scfm_platform.eval.runs import RunSummary, client, find_runs, metric_history

if TYPE_CHECKING:
    from rich.table import Table

CURVE_METRICS: tuple[str, ...] = ("loss", "val_loss", "grad_norm")  # what the trainer logs per step
_MISSING = "—"


@dataclass
class Comparison:
    """What `compare_runs` found: the runs, the params that differ, the metric rows, the table and the figure."""

    runs: list[RunSummary]
    differing: dict[str, list[str]]  # param -> value per run (_MISSING where a run lacks it)
    metrics: list[str]  # metric rows, the chosen metric first
    table: Table
    png: Path | None
    tracking_uri: str


def differing_params(runs: Sequence[RunSummary]) -> dict[str, list[str]]:
    """Params whose value is not the same in every run (a param absent from some runs differs), sorted by name."""
    keys = sorted(set().union(*(r.params for r in runs)))
    out = {}
    for key in keys:
        values = [r.params.get(key, _MISSING) for r in runs]
        if len(set(values)) > 1:
            out[key] = values
    return out


def metric_rows(runs: Sequence[RunSummary], metric: str) -> list[str]:
    """Metric names to show: `metric`, then the curve metrics, then every other logged metric alphabetically."""
    logged = set().union(*(r.metrics for r in runs))
    first = [metric, *[m for m in CURVE_METRICS if m != metric]]
    return [m for m in first if m in logged or m == metric] + sorted(logged - set(first))


def _fmt(value: Any) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def build_table(runs: Sequence[RunSummary], differing: dict[str, list[str]], metrics: Sequence[str]) -> Table:
    """rich Table: one column per run; rows are the differing params, then the final value of each metric."""
    from rich.table import Table

    table = Table(title=f"{len(runs)} runs", show_lines=False, header_style="bold")
    table.add_column("", style="cyan", no_wrap=True)
    for r in runs:
        table.add_column(f"{r.label}\n{r.run_id[:8]} {r.status.lower()}", justify="right")
    if differing:
        for key, values in differing.items():
            table.add_row(key, *values)
    else:
        table.add_row("(params)", *["identical"] * len(runs))
    table.add_section()
    for i, m in enumerate(metrics):
        table.add_row(f"[bold]{m}[/bold]" if i == 0 else m, *[_fmt(r.metrics.get(m)) for r in runs])
    return table


def compare_runs(
    *,
    experiment: str | None = None,
    run_ids: Sequence[str] = (),
    metric: str = "val_loss",
    out: str | Path | None = "compare.png",
    tracking_uri: str | None = None,
    curves: Sequence[str] = CURVE_METRICS,
) -> Comparison:
    """Read the runs (by id, else all of `experiment`), build the table, and write the curve overlay to `out`.

    Raises RunError when the runs or experiment are not found. `out=None` skips the figure; so does a set of runs
    that logged none of `curves` (then `png` is None).
    """
    c = client(tracking_uri)
    runs = find_runs(c, experiment=experiment, run_ids=run_ids)
    differing = differing_params(runs)
    metrics = metric_rows(runs, metric)
    table = build_table(runs, differing, metrics)
    png = None
    if out is not None:
        wanted = list(dict.fromkeys([*curves, metric]))
        histories = {}
        for r in runs:
            label = r.label if sum(x.label == r.label for x in runs) == 1 else f"{r.label} ({r.run_id[:6]})"
            histories[label] = {m: metric_history(c, r.run_id, m) for m in wanted if m in r.metrics}
        if any(h for h in histories.values()):
            title = experiment or ", ".join(r.label for r in runs)
            png = plot_curves(histories, out, metrics=wanted, title=title)
    return Comparison(runs, differing, metrics, table, png, c.tracking_uri)
