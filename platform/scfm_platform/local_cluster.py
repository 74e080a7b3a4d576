"""Two Ray nodes on one host (a head and a node joined to it, each owning half the CPUs and GPUs), so the multi-node
code path runs on one machine; and a one-line description of the host for benchmark tables."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scfm_platform.errors import RunError
from scfm_platform.tracking import free_port


class TwoNodeCluster:
    """Two Ray nodes on 127.0.0.1 (a head and a node joined to it), each `ray start --block` in its own process group
    with half the CPUs and half the GPUs (CUDA_VISIBLE_DEVICES split between them); token auth is off (loopback).
    Leaving the context stops both: SIGTERM to each `ray start`, then SIGKILL to what is left of its group."""

    def __init__(self, cpus: int | None = None, gpus: int | None = None):
        self.cpus, self.gpu_ids = cpus or len(os.sched_getaffinity(0)), _gpu_ids(gpus)
        if self.cpus < 2:
            raise RunError(f"--two-node splits the CPUs over two nodes; it needs --cpus ≥ 2, got {self.cpus}")
        if len(self.gpu_ids) % 2:
            raise RunError(f"--two-node splits the GPUs in half; {len(self.gpu_ids)} do not split (set --gpus even)")
        self.procs: list[subprocess.Popen] = []
        self.temps: list[str] = []
        self.address = ""
        self.nodes: list[dict[str, Any]] = []  # node_id, CPU, GPU of each node, head first
        self.logs = Path(".")  # where ray-head.log and ray-node.log go

    def logging_to(self, logs: Path) -> TwoNodeCluster:
        """This cluster, its `ray start` output going to `logs`."""
        self.logs = logs
        return self

    def env(self) -> dict[str, str]:
        """What a `launch run` needs to run on this cluster."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled"}

    def describe(self) -> str:
        return "; ".join(f"{n['node_id'][:12]} ({n['CPU']:g} CPU, {n['GPU']:g} GPU)" for n in self.nodes)

    def __enter__(self) -> TwoNodeCluster:
        try:
            half_c, half_g = self.cpus // 2, len(self.gpu_ids) // 2
            gcs = free_port()
            self.address = f"127.0.0.1:{gcs}"
            head = ["--head", f"--port={gcs}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}"]
            self._start("head", head, half_c, self.gpu_ids[:half_g])
            _wait_for_port(gcs, self.procs[0], self.logs / "ray-head.log")
            self._start("node", [f"--address={self.address}"], self.cpus - half_c, self.gpu_ids[half_g:])
            self.nodes = _alive_nodes(self.address, 2, self.procs, self.logs)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        import shutil

        for proc in reversed(self.procs):
            proc.terminate()  # `ray start --block` stops the processes it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its own process group is left
            proc.wait()
        for temp in self.temps:
            shutil.rmtree(temp, ignore_errors=True)
        self.procs, self.temps = [], []

    def _start(self, name: str, extra: list[str], cpus: int, gpus: list[str]) -> None:
        import tempfile

        temp = tempfile.mkdtemp(prefix=f"scfm-{name}-", dir="/tmp")  # short: Ray's socket paths stay < 108 chars
        self.temps.append(temp)
        cmd = [_ray_cli(), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
               f"--num-gpus={len(gpus)}", f"--temp-dir={temp}", "--disable-usage-stats", *extra]  # fmt: skip
        for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                     "runtime-env-agent-port"):  # fmt: skip
            cmd.append(f"--{flag}={free_port()}")  # Ray's fixed defaults would collide between the two nodes
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        with (self.logs / f"ray-{name}.log").open("w") as log:
            self.procs.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )


def _ray_cli() -> str:
    import shutil

    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.is_file() else shutil.which("ray")
    if not found:
        raise RunError("--two-node needs the `ray` command (Ray's CLI) next to this Python or on PATH")
    return found


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RunError(f"ray start exited {proc.returncode}; its log ends: {_tail(log)}")
        with socket.socket() as s, contextlib.suppress(OSError):
            s.settimeout(1.0)
            s.connect(("127.0.0.1", port))
            return
        if time.monotonic() > deadline:
            raise RunError(f"the Ray head did not listen on port {port} within {timeout:g} s; log: {_tail(log)}")
        time.sleep(0.5)


def _alive_nodes(address: str, want: int, procs: list, logs: Path, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Connect as a driver until `want` nodes are alive; their ids and resources (head first)."""
    import ray

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        deadline = time.monotonic() + timeout
        while True:
            alive = sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: not n.get("IsHeadNode", False))
            if len(alive) >= want:
                return [{"node_id": n["NodeID"], "CPU": n["Resources"].get("CPU", 0.0),
                         "GPU": n["Resources"].get("GPU", 0.0)} for n in alive]  # fmt: skip
            for proc, name in zip(procs, ("head", "node")):
                if proc.poll() is not None:
                    raise RunError(f"ray start ({name}) exited {proc.returncode}: {_tail(logs / f'ray-{name}.log')}")
            if time.monotonic() > deadline:
                raise RunError(
                    f"{len(alive)} of {want} Ray nodes up after {timeout:g} s: {_tail(logs / 'ray-node.log')}"
                )
            time.sleep(0.5)
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def _tail(log: Path, n: int = 600) -> str:
    return repr(log.read_text(errors="replace")[-n:]) if log.is_file() else "(no log)"


def _gpu_ids(count: int | None) -> list[str]:
    """Visible GPU ids (CUDA_VISIBLE_DEVICES, else all that nvidia-smi lists), the first `count` of them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [x for x in visible.split(",") if x.strip()]
    else:
        ids = [str(i) for i in range(len(gpu_names()))]
    if count is not None and count > len(ids):
        raise RunError(f"--gpus={count} but this host shows {len(ids)} GPUs")
    return ids if count is None else ids[:count]


def gpu_names() -> list[str]:
    import shutil

    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return [x.strip() for x in out.stdout.splitlines() if x.strip()] if out.returncode == 0 else []


def host_description() -> str:
    """CPU count and model, memory, GPUs: the `machine` line of the table."""
    cpus = len(os.sched_getaffinity(0))
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")), "")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = gpu_names()
    gpu = f"{len(gpus)}x {gpus[0]}" if gpus else "no GPU"
    return f"{cpus} CPUs{f' ({model})' if model else ''}, {mem:.0f} GiB RAM, {gpu}"
