"""MLflow: a local tracking server for `launch run`, run creation on the driver, and the rank-0 logger.

Local server: `mlflow server` on 127.0.0.1 with a sqlite backend (`<local_dir>/mlflow.db`) and a local artifact
store (`<local_dir>/artifacts`), served through the server so workers need only its URL.
Logger: metrics and params go through a background thread; when the server is unreachable training goes on, the
logger warns once per outage, keeps what it could not send (bounded) and retries with backoff.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from scfm_platform.config import redact_uri
from scfm_platform.errors import RunError

MAX_PENDING = 200_000  # metric points kept while the server is unreachable
SYSTEM_EVERY_S = 10.0  # seconds between system-metric samples


def default_tracking_uri(local_dir: str | Path = "mlruns") -> str:
    """The store behind the local server: sqlite under `local_dir` (readable without the server running)."""
    return f"sqlite:///{(Path(local_dir) / 'mlflow.db').resolve()}"


class LocalServer:
    """`mlflow server` on 127.0.0.1 with sqlite + local artifacts under `root`; `start()` returns its URL."""

    def __init__(self, root: str | Path, port: int = 0):
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", default_tracking_uri(self.root),
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip

    def start(self, timeout: float = 300.0) -> str:
        """Start the server and wait until /health answers; raises RunError with the log tail if it does not
        (or exits). The wait is long because a first start on a busy machine can take minutes (imports, tables)."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the server process and return at once (`wait_ready` then waits for it): other start-up work,
        such as starting Ray, can overlap the server's."""
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (owned by the child for its lifetime)
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300.0) -> str:
        """The server's URL once /health answers; RunError with the log tail if it exits or times out first."""
        if self.proc is None:
            raise RunError("the local MLflow server was not launched")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if healthy(self.url):
                return self.url
            time.sleep(0.5)
        self.stop()
        tail = (self.root / "server.log").read_text(errors="replace")[-1500:]
        raise RunError(f"local MLflow server on port {self.port} did not start; its log ends: {tail!r}")

    def stop(self) -> None:
        """Terminate the server (and wait for it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def healthy(url: str) -> bool:
    """True if the MLflow server at `url` answers /health."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_http() -> None:
    """Fail fast on an unreachable server; the logger does its own retrying."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def create_run(uri: str, experiment: str, run_name: str | None, tags: dict[str, str]) -> tuple[str, str]:
    """Create an MLflow run (and the experiment if new); returns (run_id, run_name)."""
    _quiet_http()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        run = client.create_run(exp_id, run_name=run_name, tags=tags)
    except Exception as e:
        msg = redact_uri(str(e).splitlines()[0] if str(e) else repr(e))
        raise RunError(f"cannot create an MLflow run at {redact_uri(uri)}: {msg}") from None
    return run.info.run_id, run.info.run_name


def finish_run(uri: str, run_id: str, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
    """Set final tags and the run status; warns instead of raising if the server is gone."""
    _quiet_http()
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        for k, v in (tags or {}).items():
            client.set_tag(run_id, k, v)
        with contextlib.redirect_stdout(io.StringIO()) as said:  # MLflow prints the run URL, credentials and all
            client.set_terminated(run_id, status=status)
        print(redact_uri(said.getvalue()), end="")
    except Exception as e:
        warnings.warn(f"MLflow: could not close run {run_id}: {redact_uri(str(e))}", stacklevel=2)


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD commit of the repository at `cwd` (with '-dirty' if tracked files changed), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=cwd, capture_output=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


class RunLogger:
    """Rank-0 logger for one MLflow run; never raises into training. Call `close()` at the end."""

    def __init__(self, uri: str, run_id: str, *, system_metrics: bool = True):
        _quiet_http()
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri, self.run_id = redact_uri(uri), run_id  # self.uri only names the server in warnings
        self._q: queue.Queue = queue.Queue()
        self._system = system_metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._q.put(("metrics", metrics, step, int(time.time() * 1000)))

    def log_params(self, params: dict[str, str]) -> None:
        self._q.put(("params", params))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._q.put(("tags", tags))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._q.put(("text", text, artifact_file))

    def close(self, timeout: float = 30.0) -> None:
        """Flush what can be flushed within `timeout` seconds (retrying an unreachable server every second until
        then), then stop the thread."""
        self._q.put(("close", time.monotonic() + timeout))
        self._thread.join(timeout + 5.0)
        self._stop.set()

    # -- background thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        metrics: list[Any] = []
        other: list[tuple] = []
        closing, outage, backoff, next_try, next_sys, deadline = False, False, 1.0, 0.0, 0.0, 0.0
        while True:
            try:
                item = self._q.get(timeout=0.5)
                while True:
                    if item[0] == "metrics":
                        _, m, step, ts = item
                        metrics += [Metric(k, float(v), ts, step) for k, v in m.items()]
                    elif item[0] == "close":
                        closing, deadline, next_try = True, item[1], 0.0  # try again now, then every second
                    else:
                        other.append(item)
                    item = self._q.get_nowait()
            except queue.Empty:
                pass
            now = time.monotonic()
            if self._system and now >= next_sys:
                next_sys = now + SYSTEM_EVERY_S
                ts = int(time.time() * 1000)
                metrics += [Metric(k, v, ts, 0) for k, v in _system_metrics().items()]
            if len(metrics) > MAX_PENDING:
                metrics = metrics[-MAX_PENDING:]
            if (metrics or other) and now >= next_try:
                try:
                    while other:
                        kind, *args = other[0]
                        if kind == "params":
                            items = [Param(k, str(v)[:6000]) for k, v in args[0].items()]
                            for i in range(0, len(items), 100):
                                self.client.log_batch(self.run_id, params=items[i : i + 100])
                        elif kind == "tags":
                            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in args[0].items()])
                        elif kind == "text":
                            self.client.log_text(self.run_id, args[0], args[1])
                        other.pop(0)
                    while metrics:
                        self.client.log_batch(self.run_id, metrics=metrics[:1000])
                        metrics = metrics[1000:]
                    if outage:
                        warnings.warn(f"MLflow at {self.uri} is reachable again; logging resumed", stacklevel=1)
                    outage, backoff = False, 1.0
                except Exception as e:
                    if not outage:
                        msg = redact_uri(str(e).splitlines()[0] if str(e) else repr(e))
                        warnings.warn(
                            f"MLflow at {self.uri} unreachable ({msg}); training goes on, logs are kept and retried",
                            stacklevel=1,
                        )
                    outage, backoff = True, min(backoff * 2, 30.0)
                    next_try = now + (1.0 if closing else backoff)
            if closing and (metrics or other) and time.monotonic() >= deadline:
                warnings.warn(
                    f"MLflow at {self.uri} still unreachable at the end: {len(metrics)} metric points and "
                    f"{len(other)} other records were not logged",
                    stacklevel=1,
                )
                return
            if closing and not (metrics or other):
                return


def _system_metrics() -> dict[str, float]:
    """CPU, memory and (where present) GPU memory of this node, MLflow's `system/` metric names."""
    out: dict[str, float] = {}
    try:
        import psutil

        out["system/cpu_utilization_percentage"] = psutil.cpu_percent()
        vm = psutil.virtual_memory()
        out["system/system_memory_usage_megabytes"] = vm.used / 2**20
        out["system/system_memory_usage_percentage"] = vm.percent
    except ImportError:
        pass
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            out[f"system/gpu_{i}_memory_usage_megabytes"] = torch.cuda.memory_allocated(i) / 2**20
    return out
