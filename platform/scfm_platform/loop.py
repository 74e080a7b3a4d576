"""The per-worker training loop that Ray Train runs on every rank.

Each step: next batch → forward → masked-gene loss → backward → grad norms → divergence check → optimizer step →
metrics (every rank reports them; rank 0 also sends them to MLflow) → validation, in-training evaluation (rank 0,
`eval.every`) and checkpoint when due. Throughput metrics are over all ranks (`tokens_per_s`, `cells_per_s`) and
per rank (`tokens_per_s_per_worker`, `mfu`); `data_wait_frac` and `peak_mem_gib` are the maximum over ranks (the
rank that waits longest for data stalls them all). Rank 0 tags the MLflow run with the Ray nodes its workers ran on.
`payload` (from the driver): config (dict), tracking {uri, run_id} or None, git_commit, resume_from (a
checkpoint directory or None; a checkpoint Ray Train hands back after a worker failure wins).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scfm_data_service import schema
from scfm_platform import checkpoint, data
from scfm_platform.checkpoint import TrainState
from scfm_platform.config import RunConfig, flatten, from_dict, redacted, redacted_yaml
from scfm_platform.engine import autocast, grad_norms, initialize
from scfm_platform.flops import batch_flops, peak_flops
from scfm_platform.model import build_model, layer_groups, masked_positions
from scfm_platform.monitor import GIB, DivergenceGuard, StepTimer, peak_memory_bytes
from scfm_platform.objective import masked_loss
from scfm_platform.step_profile import StepWindow, format_profile, phase


def train_loop(payload: dict[str, Any]) -> None:
    """Train one rank until `train.steps` (or `train.stop_at_step`), a divergence, or a failure."""
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per report per rank otherwise
    cfg = from_dict(payload["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if payload.get("use_gpu") else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg, data.vocab_size(cfg.data))
    groups, dims = layer_groups(model), model.dims
    per_epoch = data.steps_per_epoch(cfg.data, world)
    total = cfg.train.steps or cfg.train.epochs * per_epoch
    end = min(total, cfg.train.stop_at_step) if cfg.train.stop_at_step else total
    engine = initialize(cfg, model.to(device), device, total)
    if cfg.model.compile and device.type == "cuda":
        # torch.compile inside DeepSpeed (checkpoint keys stay those of the plain module)
        engine.compile(compile_kwargs={"mode": cfg.model.compile_mode})
        loss_fn = torch.compile(masked_loss, mode=cfg.model.compile_mode)  # fuses the fp32 cast into the CE
    else:
        loss_fn = masked_loss
    state = _restore(engine, rank, payload.get("resume_from"))
    nodes = _worker_nodes()
    log = _logger(cfg, payload, state, nodes) if rank == 0 else None
    guard = DivergenceGuard(cfg.train.divergence_factor, patience=cfg.train.divergence_patience)
    timer = StepTimer()
    peak = peak_flops(device, cfg.train.peak_tflops) * world
    stream = _stream(cfg, rank, world, state, per_epoch)
    stop_file = Path(payload["stop_file"]) if payload.get("stop_file") else None
    joinid_log = Path(payload["joinid_log"]) / f"rank{rank}.jsonl" if payload.get("joinid_log") else None
    last_report = time.monotonic()
    window = StepWindow(device, cfg.train.profile_after, cfg.train.profile_steps if rank == 0 else 0)
    while state.step < end:
        window.begin(state.step)
        with phase("data"):
            t_ask = time.perf_counter()
            epoch, pos, batch = next(stream)
            timer.data_ready(t_ask)
            # Counted on the host copy: no device sync for them.
            pos_M = masked_positions(batch[schema.MASK])
            lens, n_masked = batch[schema.SEQ_LENS], pos_M.shape[0]
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            pos_M = pos_M.to(device, non_blocking=True)
        with phase("forward"), autocast(cfg, device):
            out = engine(batch[schema.GENE_IDS], batch[schema.VALUES], batch[schema.SEQ_LENS], pos_M)
            loss, parts = loss_fn(out, batch, dims.value_encoding, dims.n_bins, pos_M)
        with phase("backward"):
            engine.backward(loss)
        with phase("grad norms, loss sync"):
            gnorm, per_layer = grad_norms(engine, groups)
            obj = cfg.model.objective
            binned = obj != "gene" and dims.value_encoding == "binned"
            flops = batch_flops(dims, lens, n_masked, gene_head=obj != "value", binned_value=binned)
            asked = float(stop_file is not None and stop_file.exists())  # driver got SIGINT/SIGTERM
            # A Ray Train report is a collective of every worker and costs about a second, so rank 0 decides by
            # the clock when one is due and the decision travels in this all-reduce (every rank reports at the
            # same step).
            due = float(rank == 0 and time.monotonic() - last_report >= cfg.train.report_every_s)
            losses = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())]).tolist()
            sums = _all_sum([losses[0], float(lens.sum()), len(lens), flops, *losses[1:], due, asked])
        interrupted = sums.pop() > 0  # summed over ranks: all of them stop at the same step
        report_due = sums.pop() > 0
        loss_mean = sums[0] / world
        reason = guard.check(loss_mean, gnorm)
        if reason is not None:
            window.close()
            _stop(state, reason, log)
            return
        lr = engine.get_lr()[0]
        with phase("optimizer step"):
            engine.step()
        state = TrainState(state.step + 1, epoch, pos)
        if joinid_log is not None:  # which cells this optimizer step trained on (exactly-once checks)
            joinid_log.parent.mkdir(parents=True, exist_ok=True)
            with joinid_log.open("a") as f:
                f.write(json.dumps({"step": state.step, "epoch": epoch, "ids": batch[schema.SOMA_JOINID].tolist()}))
                f.write("\n")
        with phase("metrics, reports"):
            dt, wait = timer.lap()
            wait, peak_mem = _all_reduce([wait, peak_memory_bytes(device)], dist.ReduceOp.MAX)
            worst = max(per_layer, key=per_layer.get)
            metrics = {
                "step": state.step, "epoch": epoch, "loss": loss_mean, "lr": lr, "grad_norm": gnorm,
                "grad_norm_max_layer": per_layer[worst], "grad_norm_max_layer_index": list(per_layer).index(worst),
                "tokens_per_s": sums[1] / dt, "tokens_per_s_per_worker": sums[1] / dt / world,
                "cells_per_s": sums[2] / dt,
                "mfu": sums[3] / dt / peak, "data_wait_frac": wait, "peak_mem_gib": peak_mem / GIB, "step_time_s": dt,
                "total_steps": total, "grad_norm_spikes": guard.spikes,
            }  # fmt: skip
            metrics.update({k: v / world for k, v in zip(parts, sums[4:])} if len(parts) > 1 else {})
            if cfg.train.val_every and state.step % cfg.train.val_every == 0:
                metrics["val_loss"] = _validate(engine, cfg, rank, world, device)
            if rank == 0 and cfg.eval.every and state.step % cfg.eval.every == 0:
                metrics.update(_evaluate(engine, cfg, device))
            save = (cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0) or state.step == end
            save = save or interrupted
            if log is not None:
                log.log_metrics({k: v for k, v in metrics.items() if k not in ("step", "total_steps")}, state.step)
            every = cfg.train.log_every and state.step % cfg.train.log_every == 0
            if save or report_due or every or "val_loss" in metrics or state.step == 1:
                _report(engine, metrics, state, rank, save)
                last_report = time.monotonic()
            timer.lap()  # validation and checkpoint time is not the next step's
        if (rows := window.end(state.step)) is not None:
            _log_profile(rows, window, log)
        if interrupted:
            break
    window.close()
    if log is not None:
        log.close()


def _log_profile(rows: list[dict[str, Any]], window: StepWindow, log) -> None:
    """Rank 0's step profile (`train.profile_steps`): printed to the worker log and saved as MLflow profile.txt."""
    steps = f"steps {window.first + 1}-{window.first + window.steps}"
    text = f"profile of {steps}, {window.step_ms:.1f} ms per step (wall)\n{format_profile(rows, window.step_ms)}"
    print(text, flush=True)
    if log is not None:
        log.log_text(f"{text}\n\n{json.dumps(rows, indent=1)}\n", "profile.txt")


def _stream(cfg: RunConfig, rank: int, world: int, state: TrainState, per_epoch: int) -> Iterator[tuple]:
    """(epoch, batches of the epoch consumed after this one, batch) from the resume position on, across epochs."""
    epoch, start = state.epoch, state.step_in_epoch
    while True:
        if start >= per_epoch:
            epoch, start = epoch + 1, 0
        it = data.batches(cfg.data, rank=rank, world_size=world, epoch=epoch, start_step=start)
        for pos, batch in enumerate(islice(it, per_epoch - start), start + 1):
            yield epoch, pos, batch
        epoch, start = epoch + 1, 0


def _all_sum(values: list[float]) -> list[float]:
    return _all_reduce(values, dist.ReduceOp.SUM)


def _all_reduce(values: list[float], op: dist.ReduceOp) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
        t = t.to(dev)
        dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def _worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (one all-gather; every rank calls it)."""
    import ray

    mine = ray.get_runtime_context().get_node_id()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


@torch.no_grad()
def _validate(engine, cfg: RunConfig, rank: int, world: int, device: torch.device) -> float:
    """Mean masked loss over up to `train.val_batches` held-out batches per rank (the same count on every rank)."""
    it = data.batches(cfg.data, rank=rank, world_size=world, epoch=0, split="val")
    got = list(islice(it, cfg.train.val_batches))
    n = torch.tensor([len(got)])
    if dist.is_initialized() and world > 1:
        n = n.to(device) if dist.get_backend() == "nccl" else n
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    n_val = int(n.item())
    if n_val == 0:
        return float("nan")
    engine.eval()
    total = 0.0
    dims = engine.module.dims
    for batch in got[:n_val]:
        pos_M = masked_positions(batch[schema.MASK]).to(device)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(cfg, device):
            out = engine(batch[schema.GENE_IDS], batch[schema.VALUES], batch[schema.SEQ_LENS], pos_M)
            total += masked_loss(out, batch, dims.value_encoding, dims.n_bins, pos_M)[0].item()
    engine.train()
    return _all_sum([total])[0] / (n_val * world)


def _evaluate(engine, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """Rank 0: embedding scores of the held-out labelled cells (`eval` section), as eval/<score>; never fatal."""
    import warnings
    from dataclasses import replace

    if engine.zero_optimization_stage() == 3:
        warnings.warn("eval.every is skipped under ZeRO-3 (rank 0 does not hold the whole model)", stacklevel=2)
        return {}
    try:
        import scfm_data_service
        from scfm_platform.eval.evaluate import dataset_cells, training_scores

        d, split, e = cfg.data, "val", cfg.eval
        if e.atlas:  # a separate labelled atlas: all of its cells
            d, split = replace(cfg.data, atlas=e.atlas, tokens=None, val_fraction=0.0), "train"
        elif e.datasets:  # every cell of these datasets of the training atlas
            split = "all"
        obs = scfm_data_service.read_obs(d.atlas, columns=(e.label, "dataset_id") if e.datasets else (e.label,))
        keep = dataset_cells(obs, e.datasets, d.atlas)
        d = replace(d, engine="local")  # rank 0 reads the evaluation cells in-process (no Ray Data pipeline)
        batches = data.batches(d, rank=0, world_size=1, epoch=0, split=split, only=keep)
        with autocast(cfg, device):  # the forward as training runs it
            scores = training_scores(engine.module, batches, obs[e.label], seed=cfg.train.seed, max_cells=e.max_cells)
    except Exception as e:
        warnings.warn(f"in-training evaluation failed, training goes on: {e}", stacklevel=2)
        return {}
    return {f"eval/{k}": float(v) for k, v in scores.items()}


def _report(engine, metrics: dict[str, Any], state: TrainState, rank: int, save: bool) -> None:
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    path = checkpoint.save(engine, state, rank)
    ckpt = ray.train.Checkpoint.from_directory(str(path))
    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{state.step:08d}")
    checkpoint.discard(path)


def _restore(engine, rank: int, resume_from: str | None) -> TrainState:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            return checkpoint.load(engine, d, rank)
    if resume_from:
        return checkpoint.load(engine, resume_from, rank)
    return TrainState()


def _logger(cfg: RunConfig, payload: dict[str, Any], state: TrainState, nodes: list[str]):
    tracking = payload.get("tracking")
    if not tracking:
        return None
    from scfm_platform.tracking import RunLogger

    log = RunLogger(tracking["uri"], tracking["run_id"])
    if state.step == 0:
        log.log_params(redacted(flatten(cfg)))  # no passwords, tokens or URI credentials in MLflow
        log.log_text(redacted_yaml(cfg), "config.yaml")
        tags = {"scfm.attention": cfg.model.attention, "scfm.preset": cfg.model.preset}
        if payload.get("git_commit"):
            tags["mlflow.source.git.commit"] = payload["git_commit"]
        log.set_tags(tags)
    distinct = list(dict.fromkeys(nodes))  # every launch: a restart may place the workers elsewhere
    log.set_tags({"scfm.nodes": str(len(distinct)), "scfm.worker_nodes": ",".join(distinct)})
    return log


def _stop(state: TrainState, reason: str, log) -> None:
    """Divergence: every rank reports the reason (no checkpoint: the last reported one is the last good one)."""
    import ray.train

    if log is not None:
        log.set_tags({"scfm.stop_reason": f"step {state.step + 1}: {reason}"})
        log.close()
    ray.train.report({"step": state.step, "stop_reason": f"step {state.step + 1}: {reason}"})
