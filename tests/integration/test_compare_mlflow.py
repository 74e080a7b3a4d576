"""`launch compare` against a real MLflow tracking server (sqlite backend) started on 127.0.0.1 by the test."""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from scfm_launch.commands import compare as compare_cmd
from scfm_platform.errors import RunError

# matplotlib's default colour cycle: the first and second line of every panel.
C0, C1 = np.array([0x1F, 0x77, 0xB4]) / 255, np.array([0xFF, 0x7F, 0x0E]) / 255


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A real `mlflow server` on a free local port; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = open(root / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # own group: its workers
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this test started, and nothing else
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _log_run(c, exp_id: str, name: str, params: dict[str, str], scale: float, *, diverge: bool = False) -> str:
    from mlflow.entities import Metric, Param

    run = c.create_run(exp_id, run_name=name)
    rid = run.info.run_id
    now = int(time.time() * 1000)
    metrics = []
    for step in range(0, 40):
        loss = scale * (2.0 + 3.0 * math.exp(-step / 10))
        grad = 1.0 + 0.1 * step if not diverge else 1.0 * math.exp(step / 6)
        metrics += [Metric("loss", loss, now + step, step), Metric("grad_norm", grad, now + step, step)]
        if step % 10 == 9:
            metrics.append(Metric("val_loss", loss + 0.1, now + step, step))
    c.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    c.set_terminated(rid)
    return rid


@pytest.fixture(scope="module")
def runs(server: str) -> dict[str, str]:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=server)
    exp_id = c.create_experiment("ablation")
    common = {"data.seed": "0", "train.seed": "0", "train.lr": "0.0003"}
    return {
        "sigmoid": _log_run(c, exp_id, "sigmoid", {**common, "model.attention": "sigmoid"}, 1.0),
        "softmax": _log_run(c, exp_id, "softmax", {**common, "model.attention": "softmax"}, 1.1, diverge=True),
    }


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch")
    compare_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", *argv])
    return args.func(args)


def test_compare_experiment_table_and_png(server, runs, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "compare.png"
    assert _run_cli(["--experiment", "ablation", "--tracking-uri", server, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model.attention" in text and "sigmoid" in text and "softmax" in text
    assert "data.seed" not in text and "train.lr" not in text  # identical params are not listed
    rows = [line for line in text.splitlines() if any(m in line for m in ("val_loss", "grad_norm", " loss "))]
    assert "val_loss" in rows[0]  # the chosen metric leads the metric rows

    import matplotlib.image as mpimg

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(out)[..., :3]
    assert img.ndim == 3 and img.shape[1] > 1000 and img.std() > 0.02
    for colour in (C0, C1):  # both runs' lines are drawn
        assert (np.abs(img - colour).max(axis=-1) < 0.06).sum() > 200, f"no line in colour {colour}"


def test_compare_by_run_ids_and_metric(server, runs) -> None:
    from scfm_platform.eval.compare import compare_runs

    cmp = compare_runs(run_ids=[runs["softmax"], runs["sigmoid"]], metric="grad_norm", out=None, tracking_uri=server)
    assert [r.label for r in cmp.runs] == ["softmax", "sigmoid"]
    assert cmp.differing == {"model.attention": ["softmax", "sigmoid"]}
    assert cmp.metrics[:3] == ["grad_norm", "loss", "val_loss"]
    assert cmp.runs[0].metrics["grad_norm"] > 100 * cmp.runs[1].metrics["grad_norm"]  # final values, not first
    assert cmp.png is None


def test_compare_unknown_experiment_and_run_say_what_exists(server, runs) -> None:
    from scfm_platform.eval.compare import compare_runs

    with pytest.raises(RunError, match=r"no MLflow experiment 'nope'.*ablation"):
        compare_runs(experiment="nope", tracking_uri=server, out=None)
    with pytest.raises(RunError, match="no MLflow run with id 'deadbeef'"):
        compare_runs(run_ids=["deadbeef"], tracking_uri=server, out=None)
