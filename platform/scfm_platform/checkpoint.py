"""Checkpoints: DeepSpeed's own save/load inside a Ray Train checkpoint directory.

A checkpoint directory holds DeepSpeed's tag folder `ds/` (model, ZeRO optimizer partitions, LR scheduler), one
`rng_rank{r}.pt` per rank (python, numpy, torch and CUDA generators) and `train_state.json` (step, epoch, the
position in the epoch's batch stream and the optimizer's parameter layout, `engine.param_layout`), and `run.json`
(the resolved run config, vocabulary size and MLflow run: what `load_model_for_inference` rebuilds the model from).
Every rank writes its own files into a local temporary directory and reports it; Ray Train merges them into one
directory in storage. Resuming loads all of it back, so the next steps are the ones an uninterrupted run would have
taken.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scfm_platform.engine import param_layout
from scfm_platform.errors import RunError

TAG = "ds"
STATE_FILE = "train_state.json"
RUN_FILE = "run.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch of the training stream
    step_in_epoch: int = 0  # batches of `epoch` already consumed


def save(engine, state: TrainState, rank: int, *, run: Mapping[str, Any] | None = None) -> Path:
    """Write this rank's part of a checkpoint into a new temporary directory and return it (collective).

    `run`: {"config": to_dict(cfg), "tracking": {"uri", "run_id"}} (the train loop's payload); by default taken
    from the Ray Train context this runs in. Rank 0 writes it, with the vocabulary size, to `run.json`.
    """
    path = Path(tempfile.mkdtemp(prefix="scfm-ckpt-"))
    engine.save_checkpoint(str(path), tag=TAG, client_state={"train_state": asdict(state)})
    torch.save(_rng_state(), path / f"rng_rank{rank}.pt")
    if rank == 0:
        module = getattr(engine, "module", engine)
        record = {"param_layout": param_layout(module), "weights_dtype": _weights_dtype(module)}
        (path / STATE_FILE).write_text(json.dumps({**asdict(state), **record}))
        (path / RUN_FILE).write_text(json.dumps(_run_info(engine, run if run is not None else _payload()), indent=1))
    return path


def load(engine, path: str | Path, rank: int) -> TrainState:
    """Restore model, optimizer, scheduler and this rank's RNG from a checkpoint directory (collective)."""
    path = Path(path)
    saved = json.loads((path / STATE_FILE).read_text())
    layout, want = saved.pop("param_layout", None), param_layout(getattr(engine, "module", engine))
    if layout != want:
        raise RunError(
            f"checkpoint {path} holds optimizer state for another parameter layout ({layout or 'none recorded'}, "
            f"this model: {want}): saved by an older scfm (before odd-sized parameters went last in their optimizer "
            "group) or for another model. Its ZeRO state would load into the wrong parameters; start a new run "
            "(`launch eval` and load_model_for_inference still read its weights)."
        )
    dtype, want = saved.pop("weights_dtype", None), _weights_dtype(getattr(engine, "module", engine))
    if dtype is not None and dtype != want:
        raise RunError(
            f"checkpoint {path} was saved with {dtype} weights, this run holds {want} (train.precision: bf16 keeps "
            "bf16 weights with DeepSpeed's fp32 master copy, fp32 and amp fp32 weights): DeepSpeed's optimizer state "
            "differs between the two. Resume with the precision it was saved with, or start a new run."
        )
    load_path, _ = engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {path / TAG}")
    rng = path / f"rng_rank{rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return TrainState(**saved)


def _weights_dtype(module) -> str:
    """The dtype of the model's weights as DeepSpeed holds them ("torch.bfloat16" under bf16, else float32)."""
    return str(next(module.parameters()).dtype)


def load_model_for_inference(path, cfg=None, *, device=None):
    """The model of a checkpoint (or a run's newest one) in eval mode, its RunConfig and MLflow run id.

    See `scfm_platform.inference.load_model_for_inference` (imported lazily: DeepSpeed is only needed there).
    """
    from scfm_platform.inference import load_model_for_inference as load_

    return load_(path, cfg, device=device)


def discard(path: Path) -> None:
    """Remove a local temporary checkpoint directory once Ray Train has persisted it."""
    shutil.rmtree(path, ignore_errors=True)


def _payload() -> Mapping[str, Any]:
    """The train loop's payload (train_loop_config) from the Ray Train context, or {} outside one."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().train_run_context.train_loop_config or {}
    except Exception:  # not under Ray Train v2 (or its internals moved): run.json then holds what the model knows
        return {}


def _run_info(engine, run: Mapping[str, Any]) -> dict[str, Any]:
    from scfm_platform.config import redact_uri, redacted  # no passwords or URI credentials in checkpoints

    module = getattr(engine, "module", engine)
    dims = getattr(module, "dims", None)
    tracking = run.get("tracking") or {}
    uri = tracking.get("uri")
    info: dict[str, Any] = {"tracking_uri": redact_uri(uri) if uri else uri, "run_id": tracking.get("run_id")}
    if dims is not None:
        info["vocab_size"] = dims.vocab_size
    if run.get("config") is not None:
        info["config"] = redacted(dict(run["config"]))
    return info


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
