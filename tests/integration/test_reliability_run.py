"""`launch run` survives a tracking outage and a SIGTERM, and `--resume` continues; secrets stay out of MLflow.

One scenario through the real CLI (subprocesses), a real local Ray and a real MLflow server on 127.0.0.1:
1. `launch run` starts (tiny model, synthetic:400, 1 worker, checkpoints every 5 steps) against the MLflow server,
   with an MLflow URI and a Ray address that carry credentials (one from an environment variable);
2. after the step-5 checkpoint the MLflow server is killed (its whole process group), after step 10 it is started
   again on the same port and store (in the background: training never stops) and the worker warns about the
   outage; a report every 2 steps (`train.log_every=2`, ~0.5 s each on a CPU) keeps the run going long enough
   for the restart even on a slow machine;
3. after step 15, once the server answers again, SIGTERM to `launch run`: it checkpoints at the step it is on and
   exits 143 with one message;
4. `launch run --resume` continues from that checkpoint to the end (exit 0), and `--resume` with another
   `model.preset` fails with one line naming the mismatch (exit 2).
Afterwards MLflow holds every step's loss exactly once (the outage's metrics were logged later), and no secret.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from scfm_platform.tracking import LocalServer

SECRET = "s3cr3t"
STEPS = 80
OVERRIDES = [
    "data.atlas=synthetic:400",
    "data.max_len=32",
    "data.tokens_per_batch=256",
    "data.max_cells_per_batch=8",
    "data.val_fraction=0.0",
    "model.preset=tiny",
    "model.depth=1",
    f"train.steps={STEPS}",
    "train.warmup_steps=2",
    "train.val_every=0",
    "train.log_every=2",
    "train.checkpoint_every=5",
    "train.keep_checkpoints=100",
    "deepspeed.zero_stage=1",
    "resources.num_workers=1",
    "resources.use_gpu=false",
    "resources.cpus_per_worker=1",
    "resources.max_failures=0",
    "cluster.address=http://ray:${oc.env:SCFM_TEST_PASSWORD}@127.0.0.1:8265",
]


def _launch(tmp: Path, url: str, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"SCFM_TEST_PASSWORD": SECRET}
    uri = url.replace("http://", f"http://scfm:{SECRET}@")  # the server ignores it; MLflow must not store it
    cmd = [sys.executable, "-m", "scfm_launch.cli", "run", str(tmp / "c.yaml"), "--no-progress", "--worker-logs",
           *OVERRIDES, f"train.output_dir={tmp / 'runs'}", f"tracking.uri={uri}", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp)


def _wait_for(pattern: str, base: Path, proc: subprocess.Popen, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(base.glob(pattern))
        if found:
            return found[-1]
        if proc.poll() is not None:
            pytest.fail(f"launch run ended early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {pattern} under {base} within {timeout} s")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    (tmp / "c.yaml").write_text("name: rel\n")
    server = LocalServer(tmp / "mlflow")
    url = server.start()
    out: dict = {"url": url}
    try:
        proc = _launch(tmp, url)
        t0 = time.monotonic()
        _wait_for("runs/rel/run-*/checkpoint_00000005", tmp, proc)
        os.killpg(server.proc.pid, signal.SIGKILL)  # the server and its workers, nothing else
        server.proc.wait()
        out["outage_started"] = time.monotonic() - t0
        _wait_for("runs/rel/run-*/checkpoint_00000010", tmp, proc)
        server = LocalServer(tmp / "mlflow", server.port)
        t_restart = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = pool.submit(server.start)
            _wait_for("runs/rel/run-*/checkpoint_00000015", tmp, proc)
            started.result()  # the server answers again (raises with its log if it never does)
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the MLflow restart ({time.monotonic() - t_restart:.0f} s) was done")
        proc.send_signal(signal.SIGTERM)
        t_sig = time.monotonic()
        try:
            text, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("launch run did not exit within 120 s of SIGTERM")
        out["first"] = (proc.returncode, text, time.monotonic() - t_sig)
        run_dir = next((tmp / "runs" / "rel").glob("run-*"))
        out["run_dir"] = run_dir
        out["checkpoints_after_sigterm"] = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
        out["stopped_at"] = json.loads(
            sorted(run_dir.glob("checkpoint_0*"))[-1].joinpath("train_state.json").read_text()
        )
        out["launch_json"] = (run_dir / "launch.json").read_text()
        resumed = _launch(tmp, url, "--resume")
        text, _ = resumed.communicate(timeout=400)
        out["resumed"] = (resumed.returncode, text)
        other = _launch(tmp, url, "--resume", "model.preset=small", "model.depth=0")
        text, _ = other.communicate(timeout=300)
        out["other_size"] = (other.returncode, text)
        out["elapsed"] = time.monotonic() - t0
        yield out
    finally:
        server.stop()


def test_sigterm_checkpoints_at_the_current_step_and_exits_143(scenario):
    code, text, took = scenario["first"]
    assert code == 143, text[-3000:]
    assert took < 60, took
    step = scenario["stopped_at"]["step"]
    assert 15 <= step < STEPS  # it stopped early, at the step it was on, with a checkpoint of that step
    assert scenario["checkpoints_after_sigterm"][-1] == f"checkpoint_{step:08d}"
    assert "SIGTERM: saving a checkpoint at the next step" in text
    assert f"interrupted by SIGTERM: checkpoint {scenario['run_dir']}/checkpoint_{step:08d}" in text
    driver = [line for line in text.splitlines() if " pid=" not in line]  # not Ray's forwarded worker/actor logs
    assert not any("Traceback" in line for line in driver), "\n".join(driver)[-3000:]


def test_resume_continues_from_the_signal_checkpoint_to_the_end(scenario):
    code, text = scenario["resumed"]
    step = scenario["stopped_at"]["step"]
    assert code == 0, text[-3000:]
    assert f"from checkpoint_{step:08d}" in text
    assert f"step {STEPS}" in text and "continues" in text  # same MLflow run
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=scenario["url"])
    run_id = json.loads(scenario["launch_json"])["run_id"]
    steps = [m.step for m in c.get_metric_history(run_id, "loss")]
    # every step's loss exactly once: the outage's metrics came later, resume's first step follows the saved one
    assert sorted(steps) == list(range(1, STEPS + 1)), steps
    assert c.get_run(run_id).info.status == "FINISHED"


def test_tracking_outage_warns_and_training_goes_on(scenario):
    _, text, _ = scenario["first"]
    assert "unreachable" in text and "training goes on" in text, text[-3000:]
    assert "reachable again; logging resumed" in text


def test_no_secret_in_mlflow_or_run_files_or_output(scenario):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=scenario["url"])
    run_id = json.loads(scenario["launch_json"])["run_id"]
    run = c.get_run(run_id)
    assert run.data.params["tracking.uri"].startswith("http://***@127.0.0.1:")
    assert run.data.params["cluster.address"] == "http://***@127.0.0.1:8265"
    config = Path(c.download_artifacts(run_id, "config.yaml")).read_text()
    assert "***@127.0.0.1" in config
    everything = json.dumps([run.data.params, run.data.tags]) + config + scenario["launch_json"]
    everything += scenario["first"][1] + scenario["resumed"][1] + scenario["other_size"][1]
    assert SECRET not in everything


def test_resume_with_another_model_size_fails_with_one_line(scenario):
    code, text = scenario["other_size"]
    assert code == 2, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("launch run: error:")]
    assert len(errors) == 1 and "another model size" in errors[0] and "preset=tiny" in errors[0], text[-2000:]
    assert "preset=small" in errors[0] and "Traceback" not in text
