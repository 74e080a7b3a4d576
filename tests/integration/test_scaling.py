"""`python -m scfm_platform.scaling` end to end on CPU: real `launch run`s (Ray Train, DeepSpeed ZeRO-2 over gloo),
one real MLflow server on 127.0.0.1, and a two-node run on two Ray nodes this host starts and stops.

Tiny settings (tiny model, synthetic cells of ≤ 64 tokens, 6 steps): these check the plumbing and the table, not
the speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from scfm_platform.tracking import LocalServer

ROOT = Path(__file__).resolve().parents[2]
STEPS, WARMUP = 6, 2
TINY = ["model.preset=tiny", "data.atlas=synthetic:2000", "data.max_len=64", "data.tokens_per_batch=1024",
        "data.max_cells_per_batch=16"]  # fmt: skip


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    server = LocalServer(tmp_path_factory.mktemp("mlflow"))
    yield server.start()
    server.stop()


def _scaling(out: Path, url: str, *args: str) -> dict:
    """Run the script as a user would; its scaling.json (the table) after checking it exited 0."""
    cmd = [sys.executable, "-m", "scfm_platform.scaling", "configs/demo.yaml", *args, f"--steps={STEPS}",
           f"--warmup={WARMUP}", f"--out={out}", *TINY, f"tracking.uri={url}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((out / "logs").glob("*.log")))
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}{logs}"
    assert "scaling eff." in done.stdout  # the rich table
    return json.loads((out / "scaling.json").read_text())


def _history(url: str, run_id: str, key: str = "loss") -> list[int]:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=url)
    assert c.get_run(run_id).info.status == "FINISHED"
    return [m.step for m in c.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_one_and_two_workers_zero2_table(tmp_path: Path, mlflow_url: str):
    table = _scaling(tmp_path, mlflow_url, "--workers=1,2", "--zero=2", "resources.cpus_per_worker=0.5")
    rows = table["rows"]
    assert [(r["workers"], r["zero"], r["status"]) for r in rows] == [(1, 2, "ok"), (2, 2, "ok")]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_per_worker"] > 0 and r["mfu"] > 0
        assert r["peak_mem_gib"] > 0 and 0 <= r["data_wait_frac"] <= 1 and r["steps"] == STEPS - WARMUP
        assert r["nodes"] == 1 and len(r["worker_nodes"]) == 1
        assert _history(mlflow_url, r["run_id"]) == list(range(1, STEPS + 1))
    assert rows[0]["efficiency"] == 1.0 and rows[1]["efficiency"] > 0
    assert rows[1]["tokens_per_s_per_worker"] == pytest.approx(rows[1]["tokens_per_s"] / 2)
    md = (tmp_path / "scaling.md").read_text()
    assert md.count("| ok |") == 2 and "scaling eff." in md and "- machine: " in md


@pytest.mark.slow
def test_two_nodes_on_one_host(tmp_path: Path, mlflow_url: str):
    import psutil

    # one CPU per node and per worker: each node holds exactly one worker (SPREAD asks for that as well)
    table = _scaling(tmp_path, mlflow_url, "--two-node", "--workers=2", "--zero=2", "resources.cpus_per_worker=1")
    nodes = {n["node_id"] for n in table["meta"]["cluster_nodes"]}
    (row,) = table["rows"]
    assert row["status"] == "ok" and row["nodes"] == 2 and len(nodes) == 2
    assert set(row["worker_nodes"]) == nodes  # the two workers ran on the two Ray nodes
    assert _history(mlflow_url, row["run_id"]) == list(range(1, STEPS + 1))
    (ckpt,) = tmp_path.glob(f"runs/demo/run-*/checkpoint_{STEPS:08d}")  # storage both nodes see
    assert len(list((ckpt / "ds").glob("*optim_states.pt"))) == 2  # both ZeRO-2 partitions
    port = table["meta"]["cluster_address"].rsplit(":", 1)[1]
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if _of_cluster(p.info["cmdline"] or [], port)]
    assert not left, f"processes of the two-node Ray cluster still running: {left}"


def _of_cluster(args: list[str], port: str) -> bool:
    """A process of the Ray cluster whose GCS listens on `port`: the GCS itself, or one that talks to it."""
    return any(
        a == f"--gcs_server_port={port}" or (a.startswith("--gcs-address=") and a.endswith(f":{port}")) for a in args
    )
