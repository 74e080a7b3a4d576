"""What the card runs at under each attention kernel: SM clock, power and throttle reasons while one kernel runs
back to back for a few seconds, beside its TFLOPS. `python tests/gpu/clock_probe.py` (needs a CUDA GPU and
nvidia-smi); writes $OUT/clock_probe.json. Shape: B = 2, T = 8192, H = 16, D = 128, bf16, dense, bias −log T.

If a kernel's clock sits below the idle boost clock with a power-cap reason, its speed is set by energy per tile
(tensor products + weights), not by how the two overlap; if the clock holds, the schedule is the limit."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import threading
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from scfm_kernels._bwd import attention_backward
from scfm_kernels._fwd import attention_forward

QUERY = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def _sample(stop: threading.Event, out: list[list[str]]) -> None:
    while not stop.is_set():
        line = subprocess.run(
            ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"], capture_output=True, text=True
        ).stdout.strip()
        out.append([x.strip() for x in line.split(",")])
        time.sleep(0.15)


def _probe(name: str, fn, flops: float, seconds: float = 4.0) -> dict[str, object]:
    ms = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    samples: list[list[str]] = []
    stop = threading.Event()
    t = threading.Thread(target=_sample, args=(stop, samples))
    n = max(1, int(seconds * 1e3 / ms))
    torch.cuda.synchronize()
    t.start()
    time.sleep(0.3)
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    stop.set()
    t.join()
    steady = samples[2:] or samples
    clocks = [float(s[0]) for s in steady if s[0].replace(".", "").isdigit()]
    power = [float(s[1]) for s in steady if s[1].replace(".", "").isdigit()]
    reasons = sorted({s[3] for s in steady if len(s) > 3})
    row = {
        "name": name,
        "tflops": flops / ms / 1e9,
        "sm_mhz_median": statistics.median(clocks) if clocks else -1,
        "power_w_median": statistics.median(power) if power else -1,
        "throttle_reasons": reasons,
        "samples": len(steady),
    }
    row["tflops_per_ghz"] = row["tflops"] / (row["sm_mhz_median"] / 1e3) if clocks else -1
    print(
        f"{name:<34} {row['tflops']:7.0f} TFLOPS  {row['sm_mhz_median']:6.0f} MHz  {row['power_w_median']:6.0f} W  "
        f"{row['tflops_per_ghz']:6.0f} TFLOPS/GHz  reasons {','.join(reasons)}",
        flush=True,
    )
    return row


def main() -> None:
    B, T, H, D = 2, 8192, 16, 128
    torch.manual_seed(0)
    q, k, v, go = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    lens = torch.full((B,), T, device="cuda", dtype=torch.int32)
    bias = torch.full((B,), -math.log(T), device="cuda")
    scale = D**-0.5
    fwd_flops = 4.0 * B * H * T * T * D
    rows = []
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    rows.append(_probe("matmul bf16 8192^3", lambda: a @ b, 2.0 * 8192**3))
    for sig in (3, 1):
        cfg = dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=3, SIG=sig)
        fn = lambda cfg=cfg: attention_forward(q, k, v, lens, bias, scale, False, T, config=cfg)  # noqa: E731
        rows.append(_probe(f"ours fwd 256x64 w8 s3 SIG={sig}", fn, fwd_flops))
    cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2, SIG=3)
    fn = lambda: attention_forward(q, k, v, lens, bias, scale, False, T, config=cfg)  # noqa: E731
    rows.append(_probe("ours fwd 128x64 w4 s2 SIG=3", fn, fwd_flops))
    bwd = lambda: attention_backward(go, q, k, v, lens, bias, scale, False, T)  # noqa: E731
    rows.append(_probe("ours bwd (autotuned)", bwd, 2.5 * fwd_flops))
    qt, kt, vt = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
        rows.append(_probe("cudnn softmax fwd", sdpa, fwd_flops))
        out = sdpa()
        g = go.transpose(1, 2).contiguous()
        rows.append(
            _probe(
                "cudnn softmax bwd",
                lambda: torch.autograd.grad(out, (qt, kt, vt), g, retain_graph=True),
                2.5 * fwd_flops,
            )
        )
    with open(os.path.join(os.environ.get("OUT", "."), "clock_probe.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
