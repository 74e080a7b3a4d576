"""The driver: Ray Train `TorchTrainer` over `loop.train_loop`, MLflow run setup, progress bar, resume.

`train(cfg)` connects to the Ray cluster at $RAY_ADDRESS or starts a local one, resolves the tracking URI
(`tracking.uri`, else a local MLflow server it starts and stops), creates the MLflow run (name and id printed),
and runs the workers. Runs live in `<train.output_dir>/<name>/<run-id>/` (Ray Train storage: checkpoints and the
checkpoint-manager snapshot, plus `launch.json` with the MLflow run); `resume=True` continues the newest of them.
Worker failures restart the workers from the last checkpoint up to `resources.max_failures` times.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scfm_platform.config import RunConfig, to_dict
from scfm_platform.errors import RunError

LAUNCH_FILE = "launch.json"
STOP_FILE = "STOP"  # written by the driver on SIGINT/SIGTERM; every rank checkpoints and ends at the next step


@dataclass
class TrainResult:
    """What a run left behind."""

    run_dir: Path  # Ray Train run directory (checkpoints)
    checkpoint: Path | None  # newest checkpoint directory
    tracking_uri: str | None
    mlflow_run_id: str | None
    mlflow_run_name: str | None
    metrics: dict[str, Any]  # rank 0's last reported metrics
    history: list[dict[str, Any]] = field(default_factory=list)  # rank 0's reports in order (this launch)
    stop_reason: str | None = None  # divergence reason, if the guard stopped the run
    interrupted: int | None = None  # the signal (SIGINT/SIGTERM) that ended this launch with a checkpoint


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    tracking_uri: str | None = None,
    print_fn=print,
    worker_logs: bool = False,
) -> TrainResult:
    """Run (or resume) training for `cfg`; returns when the workers finish. Raises RunError if the run fails.

    A local Ray cluster started here keeps worker output off the terminal unless `worker_logs` (the progress bar
    and MLflow carry the metrics; a failure's traceback still comes back in the error).
    """
    import ray

    _check_atlas(cfg)  # a missing or wrong atlas is one line here, not a worker traceback after Ray starts
    server = None
    uri = tracking_uri or cfg.tracking.uri
    if uri is None:  # the local MLflow server starts while Ray does
        from scfm_platform.tracking import LocalServer

        server = LocalServer(cfg.tracking.local_dir, cfg.tracking.local_port)
        server.launch()
    try:
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init()
            else:
                ray.init(include_dashboard=False, log_to_driver=worker_logs)
        cfg = _absolute_paths(cfg)
        use_gpu = _use_gpu(cfg)
        run_dir = _run_dir(cfg, resume)
        launch = _read_launch(run_dir)
        if server is not None:
            uri = server.wait_ready()
            print_fn(f"MLflow UI: {uri}  (local server: sqlite + artifacts under {server.root})")
    except BaseException:
        if server is not None:
            server.stop()
        raise
    try:
        with _stop_on_signal(run_dir / STOP_FILE, print_fn) as signals:
            result = _fit(cfg, run_dir, launch, uri, use_gpu, resume, progress, print_fn)
        result.interrupted = signals[0] if signals else None
        return result
    finally:
        if server is not None:
            server.stop()
            print_fn(f"MLflow server stopped; browse again: {' '.join(server.command()[2:])}")


def _fit(cfg, run_dir: Path, launch: dict, uri: str, use_gpu: bool, resume: bool, progress: bool, print_fn):
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from scfm_platform.config import redact_uri
    from scfm_platform.loop import train_loop
    from scfm_platform.tracking import create_run, finish_run, git_commit

    commit = git_commit()
    model = _model_shape(cfg)
    if resume and launch.get("model") and launch["model"] != model:
        was = ", ".join(f"{k}={v}" for k, v in launch["model"].items() if model.get(k) != v)
        now = ", ".join(f"{k}={v}" for k, v in model.items() if launch["model"].get(k) != v)
        raise RunError(f"--resume: the checkpoint in {run_dir} is of another model size ({was}); this config has {now}")
    if resume and launch.get("tracking_uri") == redact_uri(uri) and launch.get("run_id"):
        run_id, run_name = launch["run_id"], launch["run_name"]
        print_fn(f"MLflow run {run_name} ({run_id}) continues")
    else:
        tags = {"scfm.run_dir": str(run_dir)} | ({"mlflow.source.git.commit": commit} if commit else {})
        run_id, run_name = create_run(uri, cfg.tracking.experiment, cfg.tracking.run_name or None, tags)
        print_fn(f"MLflow run {run_name} ({run_id}); experiment '{cfg.tracking.experiment}'")
    run_dir.mkdir(parents=True, exist_ok=True)
    launch = {"tracking_uri": redact_uri(uri), "run_id": run_id, "run_name": run_name, "model": model}
    (run_dir / LAUNCH_FILE).write_text(json.dumps(launch))
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    resume_from = _latest_checkpoint(run_dir) if resume else None
    if resume:
        print_fn(f"resuming {run_dir} from {resume_from.name if resume_from else 'nothing (no checkpoint yet)'}")
    feed: Queue = Queue(maxsize=10_000)
    payload = {
        "config": to_dict(cfg),
        "use_gpu": use_gpu,
        "tracking": {"uri": uri, "run_id": run_id},
        "git_commit": commit,
        "resume_from": str(resume_from) if resume_from else None,
        "stop_file": str(run_dir / STOP_FILE),
        # SCFM_RECORD_JOINIDS=1: every rank appends each step's soma_joinids to <run_dir>/joinids/rank<r>.jsonl
        "joinid_log": str(run_dir / "joinids") if os.environ.get("SCFM_RECORD_JOINIDS") == "1" else None,
    }
    res = cfg.resources
    worker = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=payload,
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=worker,
            placement_strategy=res.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[_Feed(feed)],
        ),
    )
    history: list[dict[str, Any]] = []
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # reported on the main thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    _progress(feed, thread, history, cfg.train.steps, progress, cfg.train.stall_warn_s, print_fn)
    thread.join()
    error = outcome.get("error")
    final = history[-1] if history else {}
    stop_reason = final.get("stop_reason")
    status = "FAILED" if error is not None or stop_reason else "FINISHED"
    end_tags = {"scfm.stop_reason": stop_reason} if stop_reason else {}
    paused = cfg.train.stop_at_step or (run_dir / STOP_FILE).exists()
    if status == "FINISHED" and paused and final.get("step", 0) < final.get("total_steps", 0):
        status = "KILLED"  # paused at stop_at_step or by a signal; `--resume` continues the same MLflow run
    finish_run(uri, run_id, status, end_tags)
    if error is not None:
        msg = str(error).strip().splitlines()
        raise RunError(f"training failed: {msg[-1] if msg else type(error).__name__} (run directory {run_dir})")
    result = outcome["result"]
    ckpt = Path(result.checkpoint.path) if result.checkpoint is not None else _latest_checkpoint(run_dir)
    return TrainResult(run_dir, ckpt, uri, run_id, run_name, dict(result.metrics or final), history, stop_reason)


def _progress(
    feed, thread: threading.Thread, history: list, total: int, show: bool, stall_warn_s: float = 0.0, print_fn=print
) -> None:
    """Drain worker reports into `history` and a rich progress bar until the fit thread ends; print one warning per
    silence (no report) longer than `stall_warn_s` seconds (0: never), naming where to look."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}")]
    bar = Progress(*cols, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not show)
    with bar:
        task = bar.add_task("train", total=total or None, info="starting workers…")
        last, warned = time.monotonic(), False
        while True:
            alive = thread.is_alive()
            try:
                m = feed.get(timeout=0.5)
            except queue.Empty:
                if not alive:
                    break
                silent = time.monotonic() - last
                if stall_warn_s and silent > stall_warn_s and not warned:
                    warned = True
                    print_fn(
                        f"warning: no training report for {silent:.0f} s (train.stall_warn_s={stall_warn_s:g}): "
                        "workers may still be starting, steps may be very slow, or a worker is stuck; `ray stack` "
                        "on the head node (or `py-spy dump --pid PID` of a RayTrainWorker) shows where each one is"
                    )
                continue
            last, warned = time.monotonic(), False  # the next silence warns again
            history.append(m)
            if "stop_reason" in m:
                bar.update(task, info=f"[red]stopped: {m['stop_reason']}")
                continue
            info = f"loss {m['loss']:.4f}"
            if "val_loss" in m:
                info += f"  val {m['val_loss']:.4f}"
            info += f"  {m['tokens_per_s']:,.0f} tok/s  mfu {100 * m['mfu']:.1f}%"
            bar.update(task, completed=m["step"], total=m.get("total_steps", total), info=info)


@contextlib.contextmanager
def _stop_on_signal(stop_file: Path, print_fn):
    """SIGINT/SIGTERM: ask the workers (through `stop_file`) to checkpoint and end at their next step; a second
    signal aborts at once (KeyboardInterrupt). Yields the list the received signal numbers go into."""
    import signal

    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum, frame) -> None:
        if got:
            raise KeyboardInterrupt
        got.append(signum)
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.write_text(signal.Signals(signum).name)
        print_fn(f"{signal.Signals(signum).name}: saving a checkpoint at the next step, then exiting (again: abort)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _model_shape(cfg: RunConfig) -> dict[str, Any]:
    """What a checkpoint's tensors depend on: the preset and the resolved dims (the vocabulary comes with the data)."""
    from dataclasses import asdict

    from scfm_platform.model import resolve_dims

    d = asdict(resolve_dims(cfg.model, vocab_size=0, n_bins=cfg.data.n_bins, tokenizer=cfg.data.tokenizer))
    d.pop("vocab_size")
    return {"preset": cfg.model.preset, **d}


def _feed_class():
    from ray.train import UserCallback

    class Feed(UserCallback):
        """Runs in the Ray Train controller: forwards rank 0's report of each step to the driver's queue."""

        def __init__(self, q):
            self.q = q

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and metrics[0]:
                with contextlib.suppress(Exception):  # a full queue only costs progress-bar updates
                    self.q.put_nowait(dict(metrics[0]))

    return Feed


def _Feed(q):
    return _feed_class()(q)


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Local paths made absolute (workers run in their own directories); URIs and `synthetic:` left as they are."""
    from dataclasses import replace

    def fix(path: str | None) -> str | None:
        if not path or "://" in path or path.startswith("synthetic:"):
            return path
        return str(Path(path).expanduser().resolve())

    data = replace(cfg.data, atlas=fix(cfg.data.atlas), tokens=fix(cfg.data.tokens))
    return replace(cfg, data=data, eval=replace(cfg.eval, atlas=fix(cfg.eval.atlas)))


def _check_atlas(cfg: RunConfig) -> None:
    """RunError/DataError unless `data.atlas` is `synthetic:N` or an atlas (local paths checked here)."""
    uri = cfg.data.atlas
    if not uri or uri.startswith("synthetic:") or "://" in uri:
        return
    if not Path(uri).expanduser().exists():
        raise RunError(f"data.atlas={uri}: no such atlas; create one with `launch atlas ingest` or `launch atlas demo`")
    from scfm_data_service.atlas import read_meta

    read_meta(str(Path(uri).expanduser().resolve()))  # DataError "not an atlas" for any other directory


def _use_gpu(cfg: RunConfig) -> bool:
    import ray

    flag = cfg.resources.use_gpu
    gpus = ray.cluster_resources().get("GPU", 0)
    if flag == "true" and gpus == 0:
        raise RunError("resources.use_gpu=true but the Ray cluster has no GPUs; set resources.use_gpu=false")
    return flag == "true" or (flag == "auto" and gpus > 0)


def _run_dir(cfg: RunConfig, resume: bool) -> Path:
    base = Path(cfg.train.output_dir).resolve() / cfg.name
    if resume:
        runs = sorted(p for p in base.glob("run-*") if p.is_dir()) if base.is_dir() else []
        if not runs:
            raise RunError(f"--resume: no earlier run of '{cfg.name}' under {base}; start one without --resume")
        return runs[-1]
    return base / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{int(time.time() * 1000) % 1000:03d}"


def _read_launch(run_dir: Path) -> dict:
    f = run_dir / LAUNCH_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in run_dir.glob("checkpoint_*") if (p / "train_state.json").is_file())
    return found[-1] if found else None
