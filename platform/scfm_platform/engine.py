"""DeepSpeed engine: the config dict a RunConfig implies, `deepspeed.initialize`, and gradient norms.

One data-service batch is one micro-batch (batches are token-budgeted, so the micro-batch size is 1 "batch").
Optimizer: torch AdamW (no decay on biases, norms, LayerScale and embeddings); schedule: linear warm-up to
`train.lr`, then cosine to `lr · min_lr_ratio` at `train.steps`. DeepSpeed steps the scheduler and saves it.
Precision: bf16 on GPU, fp32 on CPU (`train.precision=auto`); `amp` keeps fp32 weights and optimizer state and runs
the forward under bf16 autocast (`autocast`), so DeepSpeed steps the optimizer without its bf16 wrapper (whose
per-parameter norms, copies and host sync cost tens of milliseconds of host time per step: docs/benchmarks.md,
run 14). Clipping: `train.grad_clip` (0: off).
On CPU, collectives are plain gloo: DeepSpeed's JIT-compiled shared-memory op is not built (`no_shared_memory_comm`).
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scfm_platform.config import RunConfig


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    """bf16 when asked, or on GPU with precision=auto."""
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def autocast(cfg: RunConfig, device: torch.device) -> torch.autocast:
    """The context the forward (and loss) runs in: bf16 autocast under `train.precision=amp`, a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "amp")


def deepspeed_config(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON config for this run."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage > 0:
        zero.update(
            overlap_comm=ds.overlap_comm,
            reduce_bucket_size=ds.reduce_bucket_size,
            allgather_bucket_size=ds.allgather_bucket_size,
            contiguous_gradients=ds.contiguous_gradients,
        )
        if ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(cfg.train.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(cfg, device)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: RunConfig, total_steps: int):
    """Multiplier of train.lr at a step: linear warm-up, then cosine down to min_lr_ratio."""
    t = cfg.train
    warm, floor = t.warmup_steps, t.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrix weights of linear layers, none on biases, norms, LayerScale, embeddings.

    DeepSpeed packs each group's parameters back to back into one flat buffer and makes them views of it, so a
    parameter whose size is not a multiple of 8 elements (the 60,003-gene output bias) would shift every later one
    off the 16-byte boundary the tensor-core kernels need: cuBLAS then runs its align-1 fallbacks (the biased
    forward products of every block took 157 of 514 ms per step on the H200). Such parameters go last in their
    group; the rest keep the model's order."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for g in groups:
        g["params"].sort(key=lambda p: p.numel() % 8 != 0)  # stable: odd sizes last, order otherwise kept
    return groups


def param_layout(model: nn.Module) -> str:
    """A fingerprint of the optimizer's parameter order and shapes (`param_groups`). DeepSpeed restores ZeRO's flat
    optimizer state (fp32 weights, Adam moments) by offset, so a checkpoint may only be loaded into the same layout:
    `checkpoint.load` refuses one saved with another (an older order, another model)."""
    names = {id(p): n for n, p in model.named_parameters()}
    shape = lambda p: tuple(getattr(p, "ds_shape", p.shape))  # noqa: E731 (ZeRO-3 partitions keep ds_shape)
    groups = param_groups(model, 0.0)
    text = "|".join(",".join(f"{names[id(p)]}:{shape(p)}" for p in g["params"]) for g in groups)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def initialize(cfg: RunConfig, model: nn.Module, device: torch.device, total_steps: int):
    """`deepspeed.initialize` with AdamW and the warm-up + cosine schedule; returns the engine."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if device.type == "cpu":
        no_shared_memory_comm(deepspeed)
    t = cfg.train
    fused = device.type == "cuda" and not cfg.deepspeed.offload_optimizer  # offloaded state lives on the CPU
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, device), dist_init_required=False
    )
    return engine


def no_shared_memory_comm(deepspeed) -> None:
    """Keep DeepSpeed's CPU backend on plain gloo collectives instead of its JIT-compiled shared-memory op.

    That op is compiled on first use under a lock file in the torch extensions folder; a process killed while
    compiling (Ctrl-C, a preempted or killed worker) leaves the lock behind and every later CPU run on that machine
    then waits on it forever, silently. The CPU path is for small runs and tests, where gloo is fast enough.
    """
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the probed dict is cached: the edit persists


def grad_norms(engine, groups: dict[str, list[nn.Parameter]]) -> tuple[float, dict[str, float]]:
    """Global and per-group L2 norms of the averaged gradients, after `engine.backward` and before `engine.step`.

    ZeRO 0 holds full averaged gradients on every rank; ZeRO 1/2/3 hold a partition each, so every rank sums the
    squares of its own fragments and one all-reduce of a [groups] vector gives the totals.
    """
    stage = engine.zero_optimization_stage()
    dev = engine.device if engine.device.type == "cuda" else torch.device("cpu")
    grads, owner = [], []  # every local gradient (fragment) and the index of its group
    for i, params in enumerate(groups.values()):
        for g in (_local_grad(p, stage) for p in params):
            if g is not None and g.numel() > 0:
                grads.append(g.detach())
                owner.append(i)
    sq = torch.zeros(len(groups), dtype=torch.float64, device=dev)
    if grads:  # one multi-tensor norm kernel, not three small kernels per parameter
        norms = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).to(dev, torch.float64)
        sq.index_add_(0, torch.tensor(owner, device=dev), norms * norms)
    if stage > 0 and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    sq = sq.cpu()
    per = {name: math.sqrt(v) for name, v in zip(groups, sq.tolist())}
    return math.sqrt(float(sq.sum())), per


def _local_grad(p: nn.Parameter, stage: int) -> torch.Tensor | None:
    if stage == 0:
        return p.grad if p.grad is not None else getattr(p, "_hp_grad", None)
    if stage == 3:
        from deepspeed.utils import safe_get_local_grad

        return safe_get_local_grad(p)
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:  # this rank holds no fragment of p
        return None
    return mapping.get_lp_grad_fragment(p._index_in_param_group)
