"""Scaling-table parts that need no Ray: peak memory, argument errors, efficiency, MLflow read-back, markdown."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from scfm_platform import scaling
from scfm_platform.loop import _all_reduce
from scfm_platform.monitor import GIB, peak_memory_bytes
from scfm_platform.scaling import Row, efficiency, read_metrics, to_markdown


def test_peak_memory_is_the_process_peak_rss_on_cpu():
    before = peak_memory_bytes(torch.device("cpu"))
    assert before > 50 * 2**20  # a Python process with torch loaded
    buf = torch.ones(32 * 2**20)  # 128 MiB, touched
    after = peak_memory_bytes(torch.device("cpu"))
    del buf
    assert after >= before and after > 128 * 2**20
    assert peak_memory_bytes(torch.device("cpu")) >= after  # a peak never goes down
    assert GIB == 2**30


def test_all_reduce_without_a_process_group_returns_the_values():
    import torch.distributed as dist

    assert _all_reduce([1.5, 3.0], dist.ReduceOp.MAX) == [1.5, 3.0]


def _rows(*spec: tuple[int, int, float | None]) -> list[Row]:
    return [Row(w, z, f"w{w}-z{z}", "launch run", tokens_per_s=t) for w, z, t in spec]


def test_efficiency_per_zero_stage_against_one_worker():
    rows = _rows((1, 2, 1000.0), (2, 2, 1900.0), (4, 2, 3600.0), (1, 3, 800.0), (2, 3, None))
    efficiency(rows)
    assert [r.efficiency for r in rows[:3]] == pytest.approx([1.0, 0.95, 0.9])
    assert rows[3].efficiency == 1.0 and rows[4].efficiency is None  # a failed run has none


def test_efficiency_without_a_one_worker_run_uses_the_fewest_workers():
    rows = _rows((2, 2, 2000.0), (4, 2, 3000.0))
    efficiency(rows)
    assert [r.efficiency for r in rows] == pytest.approx([1.0, 0.75])


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--workers", "1,x"], r"--workers='1,x' must be comma-separated positive integers"),
        (["--workers", "0,2"], r"--workers='0,2' must be comma-separated positive integers"),
        (["--zero", "2,4"], r"--zero='2,4' must be comma-separated values from 0, 1, 2, 3"),
        (["--steps", "5", "--warmup", "5"], r"--warmup=5 must be ≥ 0 and below --steps=5"),
        (["resources.num_workers=4"], r"'resources.num_workers=4': the script sets resources.num_workers, deepspeed"),
        (["model.preset=huge"], r"model.preset='huge' is not allowed"),
        (["--two-node", "--cpus", "1"], r"--two-node splits the CPUs over two nodes; it needs --cpus ≥ 2, got 1"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(argv, pattern, capsys):
    assert scaling.main(["configs/demo.yaml", "data.atlas=synthetic:100", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scaling: error: ") and err.count("\n") == 1
    assert re.search(pattern, err), err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        scaling.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--two-node" in out and "NCCL_NVLS_ENABLE=0" in out


def test_read_metrics_weights_by_step_time_and_skips_warmup(tmp_path: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("scaling", artifact_location=str(tmp_path / "art"))
    run = c.create_run(exp, run_name="scaling-w2-z2-x", tags={"scfm.nodes": "2", "scfm.worker_nodes": "aa,bb"})
    rid = run.info.run_id
    steps = {1: (0.9, 10.0, 0.5), 2: (1.0, 100.0, 0.01), 3: (3.0, 400.0, 0.02)}  # step: (step s, tok/s, wait)
    for s, (dt, tps, wait) in steps.items():
        logged = {"step_time_s": dt, "tokens_per_s": tps, "tokens_per_s_per_worker": tps / 2, "cells_per_s": 1.0,
                  "mfu": tps / 1000, "data_wait_frac": wait, "peak_mem_gib": s}  # fmt: skip
        for key, v in logged.items():
            c.log_metric(rid, key, v, step=s)
    row = Row(2, 2, "scaling-w2-z2-x", "launch run")
    read_metrics(row, uri, "scaling", warmup=1)
    assert row.run_id == rid and row.steps == 2 and row.nodes == 2 and row.worker_nodes == ["aa", "bb"]
    assert row.tokens_per_s == pytest.approx((100 * 1 + 400 * 3) / 4)  # Σ tokens / Σ time
    assert row.tokens_per_s_per_worker == pytest.approx(row.tokens_per_s / 2)
    assert row.mfu == pytest.approx(row.tokens_per_s / 1000)
    assert row.data_wait_frac == pytest.approx((0.01 + 0.06) / 4) and row.step_time_s == pytest.approx(2.0)
    assert row.peak_mem_gib == 3  # over all steps, the warm-up included
    with pytest.raises(scaling.RunError, match="no MLflow run named nope"):
        read_metrics(Row(1, 2, "nope", ""), uri, "scaling", warmup=1)
    with pytest.raises(scaling.RunError, match="no steps after the first 3"):
        read_metrics(Row(2, 2, "scaling-w2-z2-x", ""), uri, "scaling", warmup=3)


def test_markdown_and_json_have_every_row(tmp_path: Path):
    rows = _rows((1, 2, 1000.0), (2, 2, None))
    rows[0].peak_mem_gib, rows[0].mfu = 1.5, 0.45
    rows[1].status, rows[1].error = "failed", "exit 2: launch run: error: a | b"
    efficiency(rows)
    meta = {"command": "python -m scfm_platform.scaling c.yaml", "machine": "2 CPUs", "date": "2026-11-29 08:00 UTC",
            "config": "c.yaml", "steps": 10, "warmup": 2, "two_node": False}  # fmt: skip
    md = to_markdown(meta, rows)
    assert "| 1 | 2 | — | 1,000 | — | 45.0% | 100.0% | — | 1.50 | — | ok |" in md
    assert "failed: exit 2: launch run: error: a / b |" in md and "means over steps 3..10" in md
    scaling.write(tmp_path, meta, rows)
    got = json.loads((tmp_path / "scaling.json").read_text())
    assert [r["status"] for r in got["rows"]] == ["ok", "failed"] and got["meta"]["steps"] == 10
    assert (tmp_path / "scaling.md").read_text() == md
