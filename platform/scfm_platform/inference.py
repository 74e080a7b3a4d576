"""A trained model back from a checkpoint, for inference (`launch eval`), without starting distributed training.

`load_model_for_inference(path)` accepts a checkpoint directory (`checkpoint_NNNNNNNN/`, as `checkpoint.save`
wrote it through Ray Train), a run directory (`<output_dir>/<name>/run-*/`: its newest checkpoint) or a job
directory (`<output_dir>/<name>/`: the newest run's newest checkpoint). DeepSpeed's ZeRO partitions (any stage)
are consolidated into one fp32 state dict by `deepspeed.utils.zero_to_fp32` on the CPU; the model is rebuilt from
the run config saved next to them (`run.json`) and loaded strictly. Anything that does not fit raises RunError
with one line naming the path and what did not match.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scfm_platform.errors import RunError

if TYPE_CHECKING:
    import torch

    from scfm_platform.config import RunConfig
    from scfm_platform.model import CellTransformer

TAG = "ds"  # DeepSpeed tag folder inside a checkpoint (checkpoint.TAG)
STATE_FILE = "train_state.json"  # checkpoint.STATE_FILE
RUN_FILE = "run.json"  # config, vocabulary size and MLflow run of the checkpoint (checkpoint.RUN_FILE)
LAUNCH_FILE = "launch.json"  # the run directory's MLflow run (trainer.LAUNCH_FILE)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory `path` names: itself, the newest checkpoint of a run, or of a job's newest run."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise RunError(f"{path}: no such checkpoint or run directory")
    if _is_checkpoint(p):
        return p
    ckpts = _checkpoints(p)
    if not ckpts:
        runs = sorted(r for r in p.glob("run-*") if r.is_dir() and _checkpoints(r)) if p.is_dir() else []
        ckpts = _checkpoints(runs[-1]) if runs else []
    if not ckpts:
        raise RunError(
            f"{path}: not a checkpoint (no {TAG}/ with DeepSpeed files and {STATE_FILE}) and no checkpoint_* inside; "
            "pass runs/<name>/run-*/checkpoint_NNNNNNNN or its run directory"
        )
    return ckpts[-1]


def read_run_info(ckpt: Path) -> dict[str, Any]:
    """`run.json` of a checkpoint (config, vocab_size, tracking_uri, run_id); the run's launch.json fills gaps."""
    info: dict[str, Any] = {}
    f = ckpt / RUN_FILE
    if f.is_file():
        info = json.loads(f.read_text())
    launch = ckpt.parent / LAUNCH_FILE
    if launch.is_file():
        recorded = json.loads(launch.read_text())
        info.setdefault("run_id", recorded.get("run_id"))
        info.setdefault("tracking_uri", recorded.get("tracking_uri"))
    return info


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict of the whole model from the DeepSpeed files of `ckpt` (ZeRO 0-3), on the CPU."""
    import torch

    ds = ckpt / TAG
    if any(ds.glob("zero_pp_rank_*optim_states.pt")):  # ZeRO 1-3: partitions to consolidate
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no GPU probing on a CPU host
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG)
        except Exception as e:
            raise RunError(f"{ckpt}: DeepSpeed ZeRO checkpoint could not be consolidated: {_first_line(e)}") from None
    states = sorted(ds.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise RunError(f"{ckpt}: no DeepSpeed model states under {ds}")
    sd = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def load_model_for_inference(
    path: str | Path, cfg: RunConfig | None = None, *, device: str | torch.device | None = None
) -> tuple[CellTransformer, RunConfig, str | None]:
    """(model in eval mode on `device`, its RunConfig, the MLflow run id that produced it or None).

    `path`: a checkpoint, run or job directory (see module doc). `cfg`: the config to build the model from instead
    of the one saved with the checkpoint (a mismatch with the weights is then a RunError). `device`: default CUDA
    when available, else CPU.
    """
    import torch

    from scfm_platform.config import from_dict
    from scfm_platform.model import build_model

    ckpt = find_checkpoint(path)
    info = read_run_info(ckpt)
    if cfg is None:
        if "config" not in info:
            raise RunError(f"{ckpt}: no {RUN_FILE} with the run config (checkpoint written before configs were saved)")
        cfg = from_dict(info["config"])
    sd = consolidated_state_dict(ckpt)
    if "gene_emb.weight" not in sd:
        raise RunError(f"{ckpt}: holds no cell-transformer weights (no gene_emb.weight among {len(sd)} tensors)")
    vocab = int(sd["gene_emb.weight"].shape[0])
    if info.get("vocab_size") not in (None, vocab):
        raise RunError(f"{ckpt}: {RUN_FILE} says vocab_size {info['vocab_size']} but the weights have {vocab}")
    try:
        model = build_model(cfg, vocab)
    except ValueError as e:
        raise RunError(f"{ckpt}: model config does not build: {e}") from None
    _check_fits(ckpt, cfg, model.state_dict(), sd)
    model.load_state_dict(sd, strict=True)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(dev).eval(), cfg, info.get("run_id")


def _check_fits(ckpt: Path, cfg: RunConfig, want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """RunError naming the first difference between the model `cfg` builds and the checkpoint's weights."""
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shape = [(k, tuple(want[k].shape), tuple(got[k].shape)) for k in want if k in got and want[k].shape != got[k].shape]
    if not (missing or unexpected or shape):
        return
    m = cfg.model
    built = f"model.preset={m.preset} (dim {m.dim or '-'}, depth {m.depth or '-'}, heads {m.heads or '-'})"
    dim, depth = got["gene_emb.weight"].shape[1], len({k.split(".")[1] for k in got if k.startswith("blocks.")})
    held = f"checkpoint has dim {dim}, depth {depth}, vocab {got['gene_emb.weight'].shape[0]}"
    if shape:
        k, a, b = shape[0]
        what = f"{k} is {list(a)} in the model but {list(b)} in the checkpoint"
    elif missing:
        what = f"{len(missing)} model tensors missing from the checkpoint (e.g. {missing[0]})"
    else:
        what = f"{len(unexpected)} checkpoint tensors the model lacks (e.g. {unexpected[0]})"
    raise RunError(f"{ckpt}: checkpoint does not match {built}: {what}; {held}")


def _is_checkpoint(p: Path) -> bool:
    return p.is_dir() and (p / TAG).is_dir() and (p / STATE_FILE).is_file()


def _checkpoints(p: Path) -> list[Path]:
    return sorted(c for c in p.glob("checkpoint_*") if _is_checkpoint(c)) if p.is_dir() else []


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
