"""`launch run` on the embedded default: no tracking URI anywhere, so it starts its own MLflow server (sqlite +
local artifacts under tracking.local_dir) while Ray starts, prints the UI's URL, logs the run there, stops the
server at the end and says how to browse the store again. Through the real CLI in a subprocess, a real local Ray.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("ray")
pytest.importorskip("deepspeed")

TINY = [
    "data.atlas=synthetic:200",
    "data.max_len=32",
    "data.tokens_per_batch=256",
    "data.max_cells_per_batch=8",
    "model.preset=tiny",
    "model.depth=1",
    "train.steps=3",
    "train.warmup_steps=1",
    "train.val_every=0",
    "train.checkpoint_every=0",
    "resources.num_workers=1",
    "resources.use_gpu=false",
    "resources.cpus_per_worker=1",
    "resources.max_failures=0",
    "tracking.experiment=embedded",
]


def test_launch_run_starts_and_stops_its_own_mlflow_server(tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "c.yaml").write_text("name: embedded\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [sys.executable, "-m", "scfm_launch.cli", "run", "c.yaml", "--no-progress", *TINY]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    url = re.search(r"MLflow UI: (http://127\.0\.0\.1:\d+)", out)
    assert url is not None, out[-3000:]
    assert "MLflow server stopped; browse again: mlflow server --backend-store-uri sqlite:///" in out
    store = tmp_path / "mlruns" / "mlflow.db"
    assert store.is_file()  # the default tracking.local_dir, relative to where launch run ran
    c = MlflowClient(tracking_uri=f"sqlite:///{store}")  # readable without the server
    runs = c.search_runs([c.get_experiment_by_name("embedded").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2, 3]
