"""Host time of DeepSpeed's backward and optimizer step per `train.precision` and ZeRO stage, on the cell transformer.

The step's host work (Python in DeepSpeed's optimizer wrappers and hooks) does not depend on the device, so the
model is kept small in width and the batch short, with the 160M preset's depth (16 blocks: its parameter count,
229 tensors): what is left is host time. On a GPU it times each call without synchronising (host time only, the
device runs behind); on CPU compute is synchronous but small. Prints a table.

    python tests/gpu/host_step_probe.py                     # CPU, precisions bf16/amp, ZeRO 0 and 2
    python tests/gpu/host_step_probe.py --device cuda --dim 768
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def probe(precision: str, zero: int, device: torch.device, dim: int, tokens: int, steps: int) -> dict[str, float]:
    from scfm_data_service import schema
    from scfm_platform import data
    from scfm_platform.config import load_config
    from scfm_platform.engine import autocast, initialize
    from scfm_platform.model import build_model
    from scfm_platform.objective import masked_loss
    from scfm_platform.synthetic import synthetic_batch

    overrides = [
        "data.atlas=synthetic:64", "model.preset=160m", f"model.dim={dim}", f"train.precision={precision}",
        f"deepspeed.zero_stage={zero}", "train.warmup_steps=1", "train.grad_clip=0",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_model(cfg, data.vocab_size(cfg.data)).to(device)
    engine = initialize(cfg, model, device, total_steps=steps + 1)
    genes = data.vocab_size(cfg.data) - schema.N_SPECIAL
    b = synthetic_batch(1, tokens, genes, full=True, generator=torch.Generator().manual_seed(0))
    b = {k: v.to(device) for k, v in b.items()}
    dims = engine.module.dims
    times: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    for i in range(steps):
        t0 = time.perf_counter()
        with autocast(cfg, device):
            loss = masked_loss(engine(b["gene_ids"], b["values"], b["seq_lens"], b["mask"]), b, dims.value_encoding,
                               dims.n_bins)[0]  # fmt: skip
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= steps // 3:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(dt * 1e3)
    return {
        "params": len(list(engine.module.parameters())),
        **{k: statistics.median(v) for k, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dim", type=int, default=96, help="model width, a multiple of 6 heads (the preset depth is kept)"
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens of the one cell per step")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--precisions", default="bf16,amp")
    parser.add_argument("--zero", default="0,2")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29613")
    for key, val in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, val)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    print(f"{'precision':>9} | {'ZeRO':>4} | {'params':>6} | {'forward ms':>10} | {'backward ms':>11} | {'step ms':>8}")
    for precision in args.precisions.split(","):
        for zero in (int(z) for z in args.zero.split(",")):
            r = probe(precision, zero, device, args.dim, args.tokens, args.steps)
            print(f"{precision:>9} | {zero:>4} | {r['params']:>6} | {r['forward']:>10.1f} | {r['backward']:>11.1f} | "
                  f"{r['step']:>8.1f}", flush=True)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
