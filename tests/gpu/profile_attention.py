"""Where the forward's and the backward's time goes, at the bench's shapes, dense against padded. For each shape
and pass:
  - the mean device time per call of every kernel the pass launches (`torch.profiler`, CUDA activity), its share,
    and the padded/dense ratio of each kernel's rate (credited FLOPs per µs, FLOPs as the bench counts them);
  - the bench's own figure (`triton.testing.do_bench` median, which flushes L2 before each call and so also
    counts any time the GPU waits for the host to launch), the same call replayed from a CUDA graph
    (`triton.testing.do_bench_cudagraph`, no host time), and the host's time to issue one call (wall time of
    `--calls` calls issued back to back without a sync, while the GPU is still busy with a long call before them).
A do_bench figure well above the kernels' sum while the host's issue time is close to it says the bench's figure
at that shape is the host's. Lengths are the bench's (`scfm_kernels.bench._inputs`, a seed-0 generator per shape).

    PYTHONPATH=$PWD/kernels python3 tests/gpu/profile_attention.py --dims 128 --lengths 4096,8192 --pads 0,0.5 \
        --passes fwd,bwd --json F
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from collections import defaultdict

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

import scfm_kernels as sk
from scfm_kernels.bench import _inputs, _median_ms


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


def host_issue_us(fn, calls: int) -> float:
    """Wall µs per call to issue fn `calls` times with the GPU kept busy beforehand (a 50 ms sleep kernel), so
    that no call waits for the device."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(50e-3 * 1.98e9))  # ≈ 50 ms of GPU clock cycles at the H200's top clock
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / calls * 1e6


def graph_us(fn) -> float | str:
    """Median µs of fn replayed from a CUDA graph, or why it could not be captured."""
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")) * 1e3
    except Exception as err:  # reported in the table, not fatal
        return f"{type(err).__name__}: {str(err)[:80]}"


def host_profile(fn, calls: int, top: int = 12) -> list[str]:
    """The `top` functions by own host time over `calls` calls of fn (cProfile), one line each."""
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [
        f"{tt / calls * 1e6:9.1f} µs own {ct / calls * 1e6:9.1f} µs cum {nc / calls:5.1f}x  "
        f"{file.split('/')[-1]}:{line} {name}"
        for (file, line, name), (_, nc, tt, ct, _) in rows
    ]


def config_sweep(q, k, v, lens, flops: float) -> list[dict]:
    """The forward at every launch of `_fwd_ws.fwd_ws_configs`, planned (SPLIT=1) and one program per tile
    (SPLIT=0), timed from CUDA-graph replays (no host time): which launch wins at this shape."""
    from scfm_kernels import _fwd_ws
    from scfm_kernels._fwd import attention_forward
    from scfm_kernels.reference import default_bias

    T, D = q.shape[1], q.shape[3]
    bias = default_bias(lens)
    out = []
    for cfg in _fwd_ws.fwd_ws_configs(D):
        for split in (1, 0):
            launch = dict(cfg, KERNEL="ws", SPLIT=split)
            fn = lambda launch=launch: attention_forward(q, k, v, lens, bias, D**-0.5, False, T, config=launch)  # noqa: E731
            us = graph_us(fn)
            out.append(dict(config=cfg, split=split, graph_us=us))
            rate = f"{flops / us / 1e6:.0f} TFLOPS" if isinstance(us, float) else us
            print(f"    split={split} {cfg}: {us if isinstance(us, str) else f'{us:.0f} µs'} ({rate})")
    return out


def _passes(q, k, v, seq):
    out = sk.sigmoid_attention(q, k, v, seq)
    go = torch.randn_like(out)
    fwd = lambda q=q, k=k, v=v, s=seq: sk.sigmoid_attention(q, k, v, s)  # noqa: E731
    bwd = lambda: torch.autograd.grad(out, (q, k, v), go, retain_graph=True)  # noqa: E731
    return {"fwd": (fwd, 1.0), "bwd": (bwd, 2.5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="128")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--pads", default="0,0.5")
    ap.add_argument("--passes", default="fwd,bwd", help="comma list of fwd, bwd")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument(
        "--no-graph",
        action="store_true",
        help="skip the CUDA-graph replay (never run for bwd: "
        "a failed capture of autograd.grad leaves the RNG unusable for the next shape)",
    )
    ap.add_argument("--configs", action="store_true", help="fwd: time every launch of the list, planned and not")
    ap.add_argument("--host-profile", action="store_true", help="print the host's top functions per call (cProfile)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    passes = [p for p in args.passes.split(",") if p]
    if not set(passes) <= {"fwd", "bwd"}:
        raise SystemExit(f"--passes {args.passes!r}: expected a comma list of fwd, bwd")
    rows = []
    for D in map(int, args.dims.split(",")):
        for L in map(int, args.lengths.split(",")):
            for pad in map(float, args.pads.split(",")):
                B, H = 16384 // L, 2048 // D
                gen = torch.Generator(device="cuda").manual_seed(0)
                q, k, v, lens = _inputs(B, L, H, D, pad, gen)
                fns = _passes(q, k, v, None if pad == 0 else lens)
                for name in passes:
                    fn, weight = fns[name]
                    flops = weight * sum(4.0 * H * D * n * n for n in lens.tolist())
                    times = kernel_times(fn, args.calls)
                    total = sum(times.values())
                    bench_us = _median_ms(fn) * 1e3
                    graph = "skipped" if args.no_graph or name == "bwd" else graph_us(fn)
                    host = host_issue_us(fn, args.calls)
                    rows.append(dict(D=D, L=L, pad=pad, lens=lens.tolist(), kind=name, flops=flops, times=times,
                                     total_us=total, bench_us=bench_us, graph_us=graph, host_us=host))  # fmt: skip
                    g = f"{graph:.0f} µs" if isinstance(graph, float) else graph
                    print(f"D={D} L={L} p={pad} {name} lens={lens.tolist()}: kernels {total:.0f} µs "
                          f"({flops / total / 1e6:.0f} TFLOPS), do_bench {bench_us:.0f} µs "
                          f"({flops / bench_us / 1e6:.0f}), graph {g}, host issue {host:.0f} µs")  # fmt: skip
                    for kernel, us in sorted(times.items(), key=lambda kv: -kv[1]):
                        print(f"    {us:>9.1f} µs  {us / total:>6.1%}  {kernel}")
                    if args.configs and name == "fwd":
                        rows[-1]["configs"] = config_sweep(q, k, v, lens, flops)
                    if args.host_profile:
                        print("  host, per call:\n" + "\n".join("    " + line for line in host_profile(fn, 50)))
                del q, k, v, fns
    for r in (r for r in rows if r["pad"] > 0):
        dense = [d for d in rows if (d["D"], d["L"], d["pad"], d["kind"]) == (r["D"], r["L"], 0.0, r["kind"])]
        if not dense:
            continue
        d = dense[0]
        print(f"D={r['D']} L={r['L']} p={r['pad']} {r['kind']}: padded/dense rate, kernels "
              f"{(r['flops'] / r['total_us']) / (d['flops'] / d['total_us']):.3f}, do_bench "
              f"{(r['flops'] / r['bench_us']) / (d['flops'] / d['bench_us']):.3f}")  # fmt: skip
        for name in r["times"]:
            if name in d["times"]:
                ratio = (r["flops"] / r["times"][name]) / (d["flops"] / d["times"][name])
                print(f"    {ratio:.3f}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
