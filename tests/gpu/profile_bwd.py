"""Where the backward's time goes, kernel by kernel (`torch.profiler`, CUDA activity), at the bench's shapes, dense
against padded: for each shape, the mean device time per call of every kernel the backward launches, its share of
the backward, and the padded/dense ratio of each kernel's rate (credited FLOPs per µs, FLOPs as the bench counts
them). Lengths are the bench's (`scfm_kernels.bench._inputs`, a seed-0 generator per shape).

    PYTHONPATH=$PWD/kernels python3 tests/gpu/profile_bwd.py --dims 128 --lengths 4096,8192 --pads 0,0.5 --json F
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import scfm_kernels as sk
from scfm_kernels.bench import _inputs


def kernel_times(fn, calls: int) -> dict[str, float]:
    """Mean device µs per call of each CUDA kernel fn launches (fn run `calls` times under the profiler)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None)
        if us is None:
            us = event.cuda_time_total
        if us > 0:
            times[event.key[:60]] += us / calls
    return dict(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="128")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--pads", default="0,0.5")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for D in map(int, args.dims.split(",")):
        for L in map(int, args.lengths.split(",")):
            for pad in map(float, args.pads.split(",")):
                B, H = 16384 // L, 2048 // D
                gen = torch.Generator(device="cuda").manual_seed(0)
                q, k, v, lens = _inputs(B, L, H, D, pad, gen)
                out = sk.sigmoid_attention(q, k, v, None if pad == 0 else lens)
                go = torch.randn_like(out)
                flops = 2.5 * sum(4.0 * H * D * n * n for n in lens.tolist())

                def bwd(q=q, k=k, v=v, out=out, go=go):
                    return torch.autograd.grad(out, (q, k, v), go, retain_graph=True)

                times = kernel_times(bwd, args.calls)
                total = sum(times.values())
                rows.append(dict(D=D, L=L, pad=pad, lens=lens.tolist(), flops=flops, times=times, total_us=total))
                print(f"D={D} L={L} p={pad} lens={lens.tolist()}: {total:.0f} µs, {flops / total / 1e6:.0f} TFLOPS")
                for name, us in sorted(times.items(), key=lambda kv: -kv[1]):
                    print(f"    {us:>9.1f} µs  {us / total:>6.1%}  {name}")
                del q, k, v, out, go
    for r in (r for r in rows if r["pad"] > 0):
        dense = [d for d in rows if (d["D"], d["L"], d["pad"]) == (r["D"], r["L"], 0.0)]
        if not dense:
            continue
        d = dense[0]
        print(f"D={r['D']} L={r['L']} p={r['pad']}: padded/dense rate, whole backward "
              f"{(r['flops'] / r['total_us']) / (d['flops'] / d['total_us']):.3f}")  # fmt: skip
        for name in r["times"]:
            if name in d["times"]:
                ratio = (r["flops"] / r["times"][name]) / (d["flops"] / d["times"][name])
                print(f"    {ratio:.3f}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
