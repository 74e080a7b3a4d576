"""Trainer benchmark on one GPU: the cell transformer's full training step, sigmoid vs softmax attention.

    python -m scfm_platform.bench                         # 160m preset, 8 cells × 8192 tokens, sigmoid/flash/cudnn
    python -m scfm_platform.bench --compile --steps 30 --json bench.json
    python -m scfm_platform.bench --compile --profile --backends sigmoid,cudnn   # where each step's time goes

Each backend gets a fresh model (same seed) and times forward + masked-gene loss + backward + AdamW step on
synthetic full-length cells (no padding, so every SDPA backend runs), fused AdamW. Precision as the trainer runs it
(`--precision`, `train.precision`): bf16 (the default, configs/h200_160m_8k.yaml's) holds bf16 weights and grads
and steps fp32 master weights, as DeepSpeed's bf16 mode does; amp keeps fp32 weights under bf16 autocast. No Ray or
DeepSpeed: this measures the model and its attention. MFU uses `scfm_platform.flops` (attention
over valid tokens included) against the GPU's dense bf16 peak. --profile adds, per backend, two more steps under
the profiler and prints their kernel time by category (`scfm_platform.step_profile`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from scfm_platform.config import load_config
from scfm_platform.flops import batch_flops, peak_flops
from scfm_platform.model import build_model, count_params, masked_positions
from scfm_platform.objective import masked_loss
from scfm_platform.step_profile import GAP, by_category, format_profile, kernel_rows, profile_step
from scfm_platform.synthetic import synthetic_batch

BACKENDS = {  # name → config overrides
    "sigmoid": ["model.attention=sigmoid"],
    "sigmoid-1p": ["model.attention=sigmoid", "model.deterministic_attention=false"],
    "flash": ["model.attention=softmax", "model.softmax_backend=flash"],
    "cudnn": ["model.attention=softmax", "model.softmax_backend=cudnn"],
    "efficient": ["model.attention=softmax", "model.softmax_backend=efficient"],
}


class MasterWeightAdamW:
    """AdamW over fp32 master copies of 16-bit parameters, the step DeepSpeed's bf16 mode takes: the grads are
    copied up to float32, AdamW steps the masters, and the masters are copied back into the parameters."""

    def __init__(self, params, **adamw):
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().float() for p in self.params]
        for m in self.masters:
            m.grad = torch.zeros_like(m)
        self.opt = torch.optim.AdamW(self.masters, **adamw)

    def step(self) -> None:
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            torch._foreach_copy_([m.grad for m in self.masters], grads)
            self.opt.step()
            torch._foreach_copy_(self.params, self.masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def bench_one(name: str, args: argparse.Namespace) -> dict[str, float | str]:
    """Time `args.steps` training steps of one backend after `args.warmup` untimed ones."""
    cfg = load_config(
        None,
        [
            "data.atlas=bench",
            f"data.max_len={args.seq_len}",
            f"data.tokenizer={args.tokenizer}",
            f"model.preset={args.preset}",
            f"model.qk_norm={str(args.qk_norm).lower()}",
            f"model.heads={args.heads}",
            *BACKENDS[name],
        ],
    )
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg, args.genes + 3).to(dev)
    adamw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=dev.type == "cuda")
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
        opt = MasterWeightAdamW(model.parameters(), **adamw)
        autocast = contextlib.nullcontext
    else:
        opt = torch.optim.AdamW(model.parameters(), **adamw)
        autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)  # noqa: E731
    if args.compile:
        model = torch.compile(model, mode=args.compile_mode)
    core = getattr(model, "_orig_mod", model)
    gen = torch.Generator().manual_seed(0)
    batch = synthetic_batch(args.cells, args.seq_len, args.genes, full=True, generator=gen, device=dev)
    pos_M = masked_positions(batch["mask"])
    n_masked = pos_M.shape[0]
    loss_fn = torch.compile(masked_loss, mode=args.compile_mode) if args.compile else masked_loss
    flops = batch_flops(core.dims, batch["seq_lens"], n_masked)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step() -> torch.Tensor:
        with autocast():
            out = model(batch["gene_ids"], batch["values"], batch["seq_lens"], pos_M)
            loss, _ = loss_fn(out, batch, core.dims.value_encoding, core.dims.n_bins, pos_M)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tokens = args.cells * args.seq_len
    profile = {}
    if args.profile:
        rows = profile_step(step, 2, dev)
        print(f"--- {name}: profile of 2 steps (timed step {dt * 1e3:.1f} ms)\n{format_profile(rows, dt * 1e3)}")
        gaps = [r for r in rows if r["category"] == GAP]
        profile = {"profile_ms": by_category(rows), "profile_kernels": kernel_rows(rows), "profile_gaps": gaps}
    return {
        "backend": name,
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "mfu": flops / dt / peak_flops(dev),
        "tflops": flops / dt / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0,
        "loss": float(loss.detach()),
        "params": count_params(core),
        **profile,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scfm_platform.bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="160m")
    p.add_argument("--heads", type=int, default=0, help="attention heads (0: the preset's)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per cell (all valid)")
    p.add_argument("--cells", type=int, default=8, help="cells per batch")
    p.add_argument("--genes", type=int, default=60_000, help="gene vocabulary (3 special tokens are added)")
    p.add_argument("--tokenizer", default="rank", choices=("rank", "binned"))
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--backends", default="sigmoid,flash,cudnn", help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--compile-mode", default="default", choices=("default", "max-autotune-no-cudagraphs"),
        help="torch.compile mode (max-autotune-no-cudagraphs: matmuls as autotuned Triton templates, epilogue fusion)",
    )  # fmt: skip
    p.add_argument(
        "--precision", default="bf16", choices=("bf16", "amp"),
        help="bf16: bf16 weights, fp32 master weights (DeepSpeed's bf16 mode, the 160M config's); amp: fp32 weights, "
        "bf16 autocast",
    )  # fmt: skip
    p.add_argument("--profile", action="store_true", help="print where each backend's step time goes, by kernel")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the script")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --device cpu for a smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{device_name}  preset {args.preset}  {args.cells} cells x {args.seq_len} tokens  {args.precision}")
    rows = []
    for name in args.backends.split(","):
        try:
            rows.append(bench_one(name.strip(), args))
        except Exception as e:  # a backend this GPU/torch lacks is reported, not fatal
            rows.append({"backend": name, "error": str(e).splitlines()[0][:200]})
        r = rows[-1]
        if "error" in r:
            print(f"{name:>9}: unavailable: {r['error']}")
        else:
            print(
                f"{name:>9}: {r['step_s'] * 1e3:8.1f} ms/step  {r['tokens_per_s']:>10,.0f} tok/s  "
                f"MFU {100 * r['mfu']:5.1f}%  {r['tflops']:6.1f} TFLOP/s  {r['peak_mem_gib']:5.1f} GiB  "
                f"params {r['params'] / 1e6:.1f}M"
            )
        if args.device == "cuda":
            torch.cuda.empty_cache()
    ok = {r["backend"]: r for r in rows if "error" not in r}
    if "sigmoid" in ok:
        for ref in ("flash", "cudnn"):
            if ref in ok:
                print(f"sigmoid / {ref} step throughput: {ok[ref]['step_s'] / ok['sigmoid']['step_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": device_name, "torch": torch.__version__, "args": vars(args), "results": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
