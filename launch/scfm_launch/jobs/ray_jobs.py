"""Runs on an existing Ray cluster through the Ray Jobs API (a local `ray start --head`, or a KubeRay
RayCluster's dashboard, port 8265): the project is uploaded as the job's working dir and its four packages as
`py_modules`, so the cluster runs this checkout's code."""

from __future__ import annotations

import secrets
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scfm_launch.errors import UsageError
from scfm_launch.jobs.names import job_name

ROOT = Path(__file__).resolve().parents[3]  # the checkout: pyproject.toml, configs/, the package folders
PACKAGES = ("kernels/scfm_kernels", "data_service/scfm_data_service", "platform/scfm_platform", "launch/scfm_launch")
# Never uploaded (gitignore-style patterns relative to the working dir).
EXCLUDES = [
    ".venv/",
    ".git/",
    "runs/",
    "mlruns/",
    "atlases/",
    "wheels/",
    ".whl/",
    "build/",
    "dist/",
    "**/__pycache__/",
    "*.egg-info/",
    ".ruff_cache/",
    ".pytest_cache/",
    "*.zarr/",
    "*.pyc",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def client(address: str) -> Any:
    """A JobSubmissionClient for the dashboard at `address`, or a UsageError saying how to get one."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"cannot reach the Ray dashboard at {address}: {first}. Start one with `ray start --head` or "
            "`kubectl port-forward svc/<raycluster>-head-svc 8265:8265`"
        ) from None


def runtime_env(root: Path = ROOT) -> dict[str, Any]:
    """The job's runtime env: this checkout as working dir, its packages importable on every node."""
    return {
        "working_dir": str(root),
        "py_modules": [str(root / p) for p in PACKAGES],
        "excludes": list(EXCLUDES),
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }


def launch_command(args: list[str]) -> str:
    """The job's shell entrypoint: `python -m scfm_launch ARGS` (the cluster's Python, this checkout's code)."""
    return shlex.join(["python", "-m", "scfm_launch", *args])


def config_arg(config: str | Path, root: Path = ROOT) -> str:
    """The config's path inside the uploaded working dir, or a UsageError when it lies outside the project."""
    path = Path(config).resolve()
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise UsageError(
            f"{config} is outside the project ({root}); the job sees only the uploaded project, so put the "
            "config under configs/"
        ) from None


AGENT_WAIT_S = 60.0  # how long to wait for a freshly started head's job agent


def submit(address: str, name: str, entrypoint: str, root: Path = ROOT) -> str:
    """Submit `entrypoint` with the project as working dir; returns the submission id."""
    submission_id = f"{job_name(name)[:30]}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    c = client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return c.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env=runtime_env(root),
                metadata={"scfm.name": name},
            )
        except (RuntimeError, ValueError) as e:
            # A head that has just started answers 500 "No available agent" until its job agent is up.
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(2.0)
                continue
            raise UsageError(f"the Ray cluster at {address} refused the job: {str(e).strip()[:500]}") from None


def _info(c: Any, address: str, job_id: str) -> Any:
    try:
        return c.get_job_info(job_id)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise UsageError(f"no job {job_id!r} on the Ray cluster at {address} (`ray job list`)") from None
        raise UsageError(f"Ray Jobs API error for {job_id!r}: {str(e).strip()[:300]}") from None


def status(address: str, job_id: str) -> dict[str, Any]:
    """Status, message, times and entrypoint of a job."""
    info = _info(client(address), address, job_id)
    return {
        "job": job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message or "",
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def describe(st: dict[str, Any], address: str) -> str:
    """What `launch status` prints for a Ray job."""

    def ts(ms: int | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"

    lines = [
        f"job:        {st['job']} (Ray cluster {address})",
        f"status:     {st['status']}",
        f"entrypoint: {st['entrypoint']}",
        f"started:    {ts(st['start_time'])}",
    ]
    if st["end_time"]:
        lines.append(f"ended:      {ts(st['end_time'])}")
    if st["message"]:
        lines.append(f"message:    {st['message']}")
    return "\n".join(lines)


def logs(address: str, job_id: str, follow: bool) -> Iterator[str]:
    """The job's output so far, or (follow) streamed until the job ends."""
    c = client(address)
    _info(c, address, job_id)
    if not follow:
        yield c.get_job_logs(job_id)
        return
    import asyncio

    # tail_job_logs is async; run it to completion in small steps so lines appear as they come.
    loop = asyncio.new_event_loop()
    try:
        agen = c.tail_job_logs(job_id).__aiter__()
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def cancel(address: str, job_id: str) -> bool:
    """Ask Ray to stop the job; True when it was still running."""
    c = client(address)
    _info(c, address, job_id)
    return bool(c.stop_job(job_id))


def wait(address: str, job_id: str, timeout: float, poll: float = 1.0) -> str:
    """Poll until the job is terminal; its final status (or the last one seen at `timeout`)."""
    deadline = time.monotonic() + timeout
    st = status(address, job_id)["status"]
    while st not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll)
        st = status(address, job_id)["status"]
    return st
