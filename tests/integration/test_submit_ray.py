"""`launch submit --address` against a real local Ray head: the Ray Jobs API uploads this checkout, the job runs
it, status/logs/cancel follow it.

The head is `ray start --head --block` in its own process group and temp dir, so stopping it ends exactly the
processes this test started (never `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scfm_launch.cli import main
from scfm_launch.errors import UsageError
from scfm_launch.jobs import ray_jobs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*argv: str) -> int:
    """The `launch` CLI in-process (bad input: one line on stderr, exit 2)."""
    return main(list(argv))


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A local Ray head with its dashboard on 127.0.0.1; yields the dashboard URL."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="scfm-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # Ray turns token authentication on by default when the head's node address is not loopback-only; this
    # head listens on 127.0.0.1 only, so the test opts out (a cluster with tokens needs RAY_AUTH_TOKEN set).
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port=0", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={port}", "--num-cpus=2", "--num-gpus=0",
           "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"]  # fmt: skip
    # Fixed default ports (10001, 52365, ...) would collide with any other Ray on the machine: take free ones.
    for flag in ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "metrics-export-port", "runtime-env-agent-port"):  # fmt: skip
        cmd.append(f"--{flag}={free_port()}")
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 - closed in teardown
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited {head.returncode}: {(Path(temp) / 'head.log').read_text()[-2000:]}")
            try:
                ray_jobs.client(address).list_jobs()
                break
            except UsageError:
                if time.monotonic() > deadline:
                    pytest.fail(f"Ray dashboard not up after 90 s: {(Path(temp) / 'head.log').read_text()[-2000:]}")
                time.sleep(1)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # --block: ray start stops the processes it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=10)  # its graceful stop can take more than 30 s; nothing here needs it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # whatever of our own process group is left
        log.close()


def test_submit_run_follow_to_succeeded(ray_head: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A real `launch run` of the demo config on the Ray cluster: one worker, three steps, synthetic cells (the
    # uploaded project carries no atlas), its own local MLflow inside the job.
    overrides = [
        "data.atlas=synthetic:200",
        "train.steps=3",
        "train.val_every=0",
        "train.checkpoint_every=0",
        "resources.num_workers=1",
        "resources.cpus_per_worker=0.5",
        "data.max_len=64",
        "data.tokens_per_batch=1024",
    ]
    assert launch("submit", "configs/demo.yaml", "--target", "ray", "--address", ray_head, *overrides) == 0
    out = capsys.readouterr().out
    job_id = re.search(r"^job: (\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    assert job_id.startswith("demo-")
    assert "python -m scfm_launch run configs/demo.yaml data.atlas=synthetic:200" in out
    assert ray_jobs.wait(ray_head, job_id, timeout=300) == "SUCCEEDED", ray_jobs.logs(ray_head, job_id, False)

    assert launch("status", job_id, "--address", ray_head) == 0
    out = capsys.readouterr().out
    assert "status:     SUCCEEDED" in out and "python -m scfm_launch run configs/demo.yaml" in out
    assert launch("logs", job_id, "-f", "--address", ray_head) == 0  # a finished job: follow returns
    logs = capsys.readouterr().out
    assert re.search(r"^run \S+ \(\w+\): step 3 ", logs, re.M), logs[-3000:]


def test_uploaded_project_runs_and_cancel_stops_it(ray_head: str, capsys: pytest.CaptureFixture[str]) -> None:
    probe = "import scfm_launch, time; print('ORIGIN=' + scfm_launch.__file__, flush=True); time.sleep(300)"
    job_id = ray_jobs.submit(ray_head, "sleeper", f'python -c "{probe}"')
    deadline = time.monotonic() + 90
    while not (found := re.search(r"ORIGIN=(/\S+)", "".join(ray_jobs.logs(ray_head, job_id, False)))):
        assert time.monotonic() < deadline, f"job never started: {ray_jobs.status(ray_head, job_id)}"
        time.sleep(1)
    origin = found.group(1)
    assert not origin.startswith(str(ROOT)), f"the job imported the local checkout, not the upload: {origin}"
    assert "runtime_resources" in origin  # Ray's py_modules cache on the node

    assert launch("cancel", job_id, "--address", ray_head) == 0
    assert "stop requested" in capsys.readouterr().out
    assert ray_jobs.wait(ray_head, job_id, timeout=60) == "STOPPED"
    assert launch("cancel", job_id, "--address", ray_head) == 0
    assert "already finished" in capsys.readouterr().out


def test_submit_cli_dry_run_and_errors(ray_head: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        launch("submit", str(ROOT / "configs" / "demo.yaml"), "train.steps=3", "--address", ray_head, "--dry-run") == 0
    )
    out = capsys.readouterr().out
    assert "entrypoint: python -m scfm_launch run configs/demo.yaml train.steps=3" in out
    assert "- .venv/" in out and "- mlruns/" in out and "- atlases/" in out

    assert launch("status", "no-such-job", "--address", ray_head) == 2
    assert "no job 'no-such-job'" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}"
    assert launch("status", "x", "--address", dead) == 2
    assert f"cannot reach the Ray dashboard at {dead}" in capsys.readouterr().err
    outside = Path(tempfile.mkdtemp()) / "c.yaml"
    outside.write_text((ROOT / "configs" / "demo.yaml").read_text())
    assert launch("submit", str(outside), "--address", ray_head) == 2
    assert "outside the project" in capsys.readouterr().err
