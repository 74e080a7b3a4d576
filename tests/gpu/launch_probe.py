"""Host µs per call of each part of one forward and one backward call at a bench shape, with the GPU kept busy
beforehand (a sleep kernel) so that nothing waits for the device: which part of the host's time to cut.

Parts: the whole public call (with and without autograd); `attention_forward` (plan, kernel and finish launches);
the backward; the bias vector; the plan alone; the finish launch alone; an empty Triton kernel of 23 arguments (the
floor of a Triton launch); `torch.empty`. Prints a table.

    PYTHONPATH=$PWD/kernels python3 tests/gpu/launch_probe.py --length 4096 --pad 0.5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import triton
import triton.language as tl

import scfm_kernels as sk
from scfm_kernels import _fwd_ws, _split
from scfm_kernels._fwd import attention_forward
from scfm_kernels._op import _bias_vector
from scfm_kernels.bench import _inputs


@triton.jit
def _empty(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20, a21,
           a22, X: tl.constexpr):  # fmt: skip
    pass


def issue_us(fn, calls: int = 20, rounds: int = 9) -> float:
    """Median over rounds of the wall µs per call of `calls` calls issued while the GPU sleeps. Few calls per
    round: the device's launch queue holds about a thousand launches, and a host that fills it waits for the GPU
    (200 calls of six launches each read 1.1 ms per forward call in run 22's first call)."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(rounds):
        torch.cuda._sleep(int(0.2 * 1.98e9))  # ≈ 200 ms: longer than any round below
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--pad", type=float, default=0.5)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args()
    L, D = args.length, args.dim
    B, H = 16384 // L, 2048 // D
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, lens = _inputs(B, L, H, D, args.pad, gen)
    qd, kd, vd = (t.detach() for t in (q, k, v))
    bias = _bias_vector(lens, None, L)
    scale = D**-0.5
    out = sk.sigmoid_attention(q, k, v, lens)
    go = torch.randn_like(out)
    rows = _fwd_ws.tile_rows(D, None)
    n_m = triton.cdiv(L, rows)
    plan = _split.prepare(lens, False, L, (B, H, n_m), rows, rows, D)
    small = torch.empty(1, device="cuda")
    parts = {
        "forward, public call (autograd)": lambda: sk.sigmoid_attention(q, k, v, lens),
        "forward, public call (no grad)": lambda: sk.sigmoid_attention(qd, kd, vd, lens),
        "forward, attention_forward": lambda: attention_forward(qd, kd, vd, lens, bias, scale, False, L),
        "backward, autograd.grad": lambda: torch.autograd.grad(out, (q, k, v), go, retain_graph=True),
        "bias vector": lambda: _bias_vector(lens, None, L),
        "plan (prepare: plan launch + 2 empty)": lambda: _split.prepare(lens, False, L, (B, H, n_m), rows, rows, D),
        "finish launch": lambda: _split.finish(
            (out, out.stride(0), out.stride(1), out.stride(2)),
            plan.part,
            plan.work,
            (L, plan.nsm, plan.total),
            dict(TILE_ROWS=rows, HEAD_DIM=D, VARLEN=False),
        ),
        "empty Triton kernel, 23 args": lambda: _empty[(1,)](*([small] * 12), *([7] * 11), X=1),
        "torch.empty": lambda: torch.empty(16, device="cuda"),
    }
    print(f"L={L} pad={args.pad} D={D} B={B} H={H} lens={lens.tolist()}")
    print(f"{'part':44s} {'host µs/call':>12s}")
    for name, fn in parts.items():
        print(f"{name:44s} {issue_us(fn):12.1f}", flush=True)


if __name__ == "__main__":
    main()
