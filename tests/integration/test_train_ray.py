"""Training through real Ray Train + DeepSpeed (CPU, gloo) with a real MLflow server on 127.0.0.1.

One 2-worker ZeRO-2 run (loss goes down, MLflow has params/metrics/config and rank 0's profile of steps 3-4, both
ZeRO partitions are saved); the same run stopped after 6 steps and resumed with `--resume`, and the same run with
a training worker killed after its step-6 checkpoint: in both, the steps after the checkpoint have the
uninterrupted run's losses.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from scfm_platform.config import load_config  # noqa: E402
from scfm_platform.tracking import LocalServer  # noqa: E402
from scfm_platform.trainer import train  # noqa: E402

STEPS = 12
BASE = [
    "data.max_len=64",
    "data.tokens_per_batch=1024",
    "data.max_cells_per_batch=16",
    "data.val_fraction=0.1",
    f"train.steps={STEPS}",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.val_every=6",
    "train.val_batches=2",
    "train.checkpoint_every=6",
    "train.log_every=1",
    "train.profile_steps=2",
    "train.profile_after=2",
    "deepspeed.zero_stage=2",
    "resources.num_workers=2",
    "resources.use_gpu=false",
    "resources.cpus_per_worker=0.5",
    "resources.max_failures=0",
]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> str:
    """The demo atlas from the data service when it can build one, else the synthetic stream."""
    import scfm_data_service

    if not hasattr(scfm_data_service, "build_demo_atlas"):
        return "synthetic:600"
    uri = str(tmp_path_factory.mktemp("atlas") / "demo")
    scfm_data_service.build_demo_atlas(uri, synthetic_cells=400)
    return uri


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    server = LocalServer(tmp_path_factory.mktemp("mlflow"))
    url = server.start()
    yield url
    server.stop()
    ray.shutdown()


def _cfg(atlas: str, out: Path, *extra: str):
    return load_config(None, [f"data.atlas={atlas}", f"train.output_dir={out}", *BASE, *extra])


@pytest.fixture(scope="module")
def full_run(cluster, atlas, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return train(_cfg(atlas, out, "name=full"), progress=False, print_fn=lambda *_: None, tracking_uri=cluster)


def test_zero2_two_workers_loss_decreases(full_run):
    losses = [h["loss"] for h in full_run.history]
    assert [h["step"] for h in full_run.history] == list(range(1, STEPS + 1))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert full_run.stop_reason is None
    ckpt = full_run.checkpoint
    assert ckpt is not None and ckpt.name == f"checkpoint_{STEPS:08d}"
    shards = sorted(p.name for p in (ckpt / "ds").glob("*optim_states.pt"))
    assert len(shards) == 2 and "zero_pp_rank_1" in shards[1], shards  # both ZeRO-2 partitions saved
    assert {"rng_rank0.pt", "rng_rank1.pt", "train_state.json"} <= {p.name for p in ckpt.iterdir()}
    last = full_run.history[-1]
    for key in ("lr", "grad_norm", "grad_norm_max_layer", "tokens_per_s", "cells_per_s", "mfu", "data_wait_frac"):
        assert last[key] >= 0, key
    assert 0 < last["grad_norm_max_layer"] <= last["grad_norm"]
    assert "val_loss" in full_run.history[5] and "val_loss" in full_run.history[11]


def test_mlflow_has_params_metrics_config(full_run, cluster):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=cluster)
    run = c.get_run(full_run.mlflow_run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["model.attention"] == "sigmoid" and p["deepspeed.zero_stage"] == "2" and p["train.steps"] == str(STEPS)
    for key in ("loss", "val_loss", "lr", "grad_norm", "grad_norm_max_layer", "tokens_per_s", "mfu"):
        assert key in run.data.metrics, key
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == list(range(1, STEPS + 1))
    assert any(k.startswith("system/") for k in run.data.metrics)
    assert "mlflow.source.git.commit" in run.data.tags
    config_file = c.download_artifacts(run.info.run_id, "config.yaml")
    assert "attention: sigmoid" in Path(config_file).read_text()
    profile = Path(c.download_artifacts(run.info.run_id, "profile.txt")).read_text()  # train.profile_steps=2
    assert profile.startswith("profile of steps 3-4,") and "matmul" in profile and "ms/step" in profile


def test_stop_and_resume_gives_the_same_losses(full_run, cluster, atlas, tmp_path):
    cfg = _cfg(atlas, tmp_path, "name=split", "train.stop_at_step=6")
    first = train(cfg, progress=False, print_fn=lambda *_: None, tracking_uri=cluster)
    assert first.history[-1]["step"] == 6 and first.checkpoint.name == "checkpoint_00000006"
    second = train(cfg_resume := _cfg(atlas, tmp_path, "name=split"), resume=True, progress=False,
                   print_fn=lambda *_: None, tracking_uri=cluster)  # fmt: skip
    assert cfg_resume.train.stop_at_step == 0
    assert [h["step"] for h in second.history] == list(range(7, STEPS + 1))
    assert second.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues
    want = [h["loss"] for h in full_run.history[6:]]
    got = [h["loss"] for h in second.history]
    assert got == pytest.approx(want, abs=1e-6, rel=0)
    assert [h["loss"] for h in first.history] == pytest.approx([h["loss"] for h in full_run.history[:6]], abs=1e-6)


@pytest.mark.slow
def test_worker_killed_restarts_from_last_checkpoint(full_run, cluster, atlas, tmp_path, monkeypatch):
    import psutil

    monkeypatch.setenv("SCFM_RECORD_JOINIDS", "1")  # every rank logs each optimizer step's soma_joinids

    killed: list[int] = []

    def kill_a_worker_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            if list(tmp_path.glob("crash/run-*/checkpoint_00000006")):
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if not (proc.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker"):
                        continue
                    mine = False  # only a worker of this test's Ray (a child of the raylet it started)
                    with contextlib.suppress(psutil.Error):
                        mine = os.getpid() in {p.pid for p in proc.parents()}
                    if mine:
                        proc.kill()
                        killed.append(proc.info["pid"])
                        return
            time.sleep(0.05)

    threading.Thread(target=kill_a_worker_after_first_checkpoint, daemon=True).start()
    cfg = _cfg(atlas, tmp_path, "name=crash", "resources.max_failures=1")
    result = train(cfg, progress=False, print_fn=lambda *_: None, tracking_uri=cluster)
    assert killed, "no training worker was killed"
    after = result.history[-(STEPS - 6) :]
    assert [h["step"] for h in after] == list(range(7, STEPS + 1))
    assert [h["loss"] for h in after] == pytest.approx([h["loss"] for h in full_run.history[6:]], abs=1e-6, rel=0)
    _check_cells_exactly_once(cfg, result.run_dir)


def _check_cells_exactly_once(cfg, run_dir: Path) -> None:
    """The steps that survived (per rank and step, the last record: the restart redid 7..12) trained on exactly
    the cells the data service assigns to those steps: none lost, none repeated within epoch 0."""
    import json
    from collections import Counter

    from scfm_platform import data

    world, per_epoch = cfg.resources.num_workers, data.steps_per_epoch(cfg.data, cfg.resources.num_workers)
    survived: dict[tuple[int, int], tuple[int, list[int]]] = {}
    written = 0
    for rank in range(world):
        for line in (run_dir / "joinids" / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            survived[rank, rec["step"]] = (rec["epoch"], rec["ids"])
            written += 1
    assert written > world * STEPS  # the killed attempt's steps after the checkpoint were logged, then redone
    assert sorted({s for _, s in survived}) == list(range(1, STEPS + 1))
    got = Counter(i for (_, s), (ep, ids) in survived.items() if ep == 0 for i in ids)
    want: Counter = Counter()
    for rank in range(world):
        batches = data.batches(cfg.data, rank=rank, world_size=world, epoch=0)
        for _, b in zip(range(min(per_epoch, STEPS)), batches, strict=False):
            want.update(b["soma_joinid"].tolist())
    assert max(got.values()) == 1, "a cell was trained on twice in epoch 0"
    assert got == want, f"lost {len(want - got)} cells, extra {len(got - want)}"
    print(f"cells: {len(got)} delivered once each over {len(survived)} surviving rank-steps; {written} logged")
