"""MLflow side of evaluation: which tracking URI, reading runs and metric histories, logging scores to a run.

Works against any tracking URI MlflowClient accepts (http(s) server, sqlite, file store).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from scfm_platform.errors import RunError

if TYPE_CHECKING:
    from mlflow import MlflowClient

SCORE_PREFIX = "eval/"  # MLflow metric names of evaluation scores: eval/asw_label, eval/knn_accuracy, ...
CHECKPOINT_TAG = "scfm.checkpoint"  # tag on an eval run: the checkpoint it evaluated
SOURCE_RUN_TAG = "scfm.source_run_id"  # tag on an eval run: the training run that produced the checkpoint


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """The local store `launch run` uses when tracking.uri is unset: sqlite under ./mlruns (TrackingConfig)."""
    try:  # the trainer's own definition, once it exists, is the one truth
        from scfm_platform.tracking import default_tracking_uri as trainer_default  # type: ignore[attr-defined]

        return trainer_default()
    except ImportError:
        pass
    from scfm_platform.config import TrackingConfig

    base = Path(cwd or Path.cwd()) / TrackingConfig().local_dir
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`uri` if given, else $MLFLOW_TRACKING_URI, else `default_tracking_uri()`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def client(uri: str | None = None) -> MlflowClient:
    """An MlflowClient on `resolve_tracking_uri(uri)`."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(uri))


@dataclass
class RunSummary:
    """One MLflow run: identity, params and the last value of each metric."""

    run_id: str
    name: str
    status: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Short name for tables and legends: the run name, else the first 8 characters of its id."""
        return self.name or self.run_id[:8]


def find_runs(c: MlflowClient, *, experiment: str | None = None, run_ids: Sequence[str] = ()) -> list[RunSummary]:
    """The runs named by id (in that order), else all runs of `experiment` (oldest first); raises RunError."""
    from mlflow.exceptions import MlflowException

    if run_ids:
        runs = []
        for rid in run_ids:
            try:
                runs.append(c.get_run(rid))
            except MlflowException:
                raise RunError(f"no MLflow run with id {rid!r} at {c.tracking_uri}") from None
    else:
        name = experiment or "scfm"
        exp = c.get_experiment_by_name(name)
        if exp is None:
            known = [e.name for e in c.search_experiments()]
            raise RunError(f"no MLflow experiment {name!r} at {c.tracking_uri}; experiments there: {known}")
        runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
        if not runs:
            raise RunError(f"MLflow experiment {name!r} at {c.tracking_uri} has no runs")
    return [
        RunSummary(
            run_id=r.info.run_id,
            name=r.info.run_name or "",
            status=r.info.status,
            params=dict(r.data.params),
            metrics=dict(r.data.metrics),
        )
        for r in runs
    ]


def metric_history(c: MlflowClient, run_id: str, metric: str) -> tuple[list[float], list[float]]:
    """(steps [S], values [S]) of one metric of one run, by step; empty if the run never logged it."""
    points = sorted(c.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
    return [float(p.step) for p in points], [float(p.value) for p in points]


def log_scores(
    c: MlflowClient,
    scores: Mapping[str, float],
    *,
    run_id: str | None = None,
    experiment: str = "scfm",
    step: int = 0,
    tags: Mapping[str, str] | None = None,
    artifacts: Sequence[str | Path] = (),
) -> str:
    """Log `scores` as eval/<name> metrics (NaN skipped) to `run_id`, or to a new run in `experiment`; its id.

    A run that already finished accepts new metrics; its status stays as it was.
    """
    if run_id is None:
        exp = c.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else c.create_experiment(experiment)
        run = c.create_run(exp_id, tags=dict(tags or {}), run_name="eval")
        run_id, created = run.info.run_id, True
    else:
        created = False
        for k, v in (tags or {}).items():
            c.set_tag(run_id, k, v)
    for name, value in scores.items():
        if value is not None and not math.isnan(float(value)):
            c.log_metric(run_id, f"{SCORE_PREFIX}{name}", float(value), step=step)
    for path in artifacts:
        c.log_artifact(run_id, str(path), artifact_path="eval")
    if created:
        c.set_terminated(run_id)
    return run_id
