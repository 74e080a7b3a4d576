"""The schedule the H200 ran for the warp-specialized forward, from per-program global-timer stamps
(`_fwd_ws.trace`): per shape and launch (planned or one program per tile), the kernel's span against the ideal of
its busy time spread over every multiprocessor, and where each program's time goes (plan, start until its Q lands,
key loop, epilogue and exit, gaps between programs on one multiprocessor). --npz keeps the raw stamps.

    PYTHONPATH=$PWD/kernels python3 tests/gpu/trace_fwd_ws.py [--npz traces.npz] [--json summary.json]
    python3 tests/gpu/trace_fwd_ws.py --summarize traces.npz        # again from saved stamps, no GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import numpy as np

# Stamp columns (`_fwd_ws.trace`).
START, PLAN, END, SM, Q_LANDED, LOOP_DONE, Q_CYCLES, LOOP_CYCLES = range(8)


def summarize(stamps: np.ndarray, n_sm: int) -> dict:
    """stamps int64 [programs, 8] of one launch → figures in µs (and the key loop's clock in MHz)."""
    t0 = stamps[:, START].min()
    s = (stamps[:, :6] - np.array([t0, t0, t0, 0, t0, t0])) / 1e3
    s[stamps[:, Q_LANDED] == 0, Q_LANDED] = np.nan
    s[stamps[:, LOOP_DONE] == 0, LOOP_DONE] = np.nan
    real = ~np.isnan(s[:, Q_LANDED])
    span = s[:, END].max()
    busy = s[:, END] - s[:, START]
    gaps, last_end = [], []
    for sm in np.unique(stamps[:, SM]):
        rows = s[stamps[:, SM] == sm]
        rows = rows[np.argsort(rows[:, START])]
        gaps.append(float(np.sum(np.maximum(rows[1:, START] - rows[:-1, END], 0.0))))
        last_end.append(float(rows[:, END].max()))
    loop = s[real, LOOP_DONE] - s[real, Q_LANDED]
    cycles = (stamps[real, LOOP_CYCLES] - stamps[real, Q_CYCLES]).astype(np.float64)
    med = lambda a: float(np.median(a)) if len(a) else float("nan")  # noqa: E731
    return {
        "programs": len(s), "real": int(real.sum()), "sms": len(last_end),
        "span_us": float(span),
        "ideal_us": float(busy[real].sum() / n_sm),
        "busy_all_us": float(busy.sum() / n_sm),
        "plan_us": med(s[:, PLAN] - s[:, START]),
        "to_q_us": med(s[real, Q_LANDED] - s[real, START]),
        "loop_us": med(loop),
        "loop_mhz": med(cycles / np.maximum(loop, 1e-3)),
        "loop_min_us": float(np.min(loop)) if len(loop) else float("nan"),
        "epilogue_us": med(s[real, END] - s[real, LOOP_DONE]),
        "empty_us": med(busy[~real]),
        "gap_per_sm_us": med(gaps), "gap_max_us": float(max(gaps)),
        "sm_idle_at_end_us": med(span - np.array(last_end)),
        "first_start_spread_us": float(np.sort(s[:, START])[min(n_sm, len(s)) - 1]),
    }  # fmt: skip


def _print(name: str, f: dict) -> None:
    print(
        f"{name:>22} progs {f['programs']:5d} real {f['real']:5d} span {f['span_us']:8.1f} ideal {f['ideal_us']:8.1f} "
        f"(eff {f['ideal_us'] / f['span_us']:.3f}) plan {f['plan_us']:5.2f} to_q {f['to_q_us']:5.2f} "
        f"loop {f['loop_us']:7.1f} @{f['loop_mhz']:5.0f} MHz epi {f['epilogue_us']:5.2f} empty {f['empty_us']:5.2f} "
        f"gaps/sm {f['gap_per_sm_us']:6.1f} idle_end {f['sm_idle_at_end_us']:6.1f}",
        flush=True,
    )


def run(npz: str | None, json_out: str | None) -> None:
    import torch
    from triton.testing import do_bench

    from scfm_kernels import _fwd, _fwd_ws, _split

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from probe_ws import BENCH_LENS

    n_sm = _split.num_sms(torch.device("cuda"))
    print(torch.cuda.get_device_name(), torch.__version__, "SMs", n_sm)
    shapes = [("4K", 4, 4096, 0.0), ("4K p.5", 4, 4096, 0.5), ("8K", 2, 8192, 0.0), ("8K p.5", 2, 8192, 0.5)]
    shapes += [("16K", 1, 16384, 0.0), ("16K p.5", 1, 16384, 0.5), ("trainer", 8, 8192, 0.0)]
    D = 128
    gen = torch.Generator(device="cuda").manual_seed(3)
    raw, out = {}, []
    for name, B, L, pad in shapes:
        H = 6 if name == "trainer" else 2048 // D
        q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
        if pad:
            lens = torch.tensor(BENCH_LENS[(D, L, pad)], device="cuda", dtype=torch.int32)
        flops = sum(4.0 * H * D * n * n for n in lens.tolist())
        bias = -torch.log(lens.float())
        buf = torch.zeros(8 * _split.grid_size(triton_cdiv(L, 192), B, H, n_sm), dtype=torch.int64, device="cuda")
        for ci, cfg in enumerate(_fwd_ws.fwd_ws_configs(D)[:1]):
            for split in (0, 1):
                c = dict(cfg, KERNEL="ws", SPLIT=split)
                fn = functools.partial(_fwd.attention_forward, q, k, v, lens, bias, D**-0.5, False, L, config=c)
                ms = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
                spans = []
                for rep in range(5):
                    buf.zero_()
                    with _fwd_ws.trace(buf):
                        fn()
                    torch.cuda.synchronize()
                    st = buf.view(-1, 8).cpu().numpy()
                    st = st[st[:, START] != 0]
                    f = summarize(st, n_sm)
                    spans.append(f["span_us"])
                    raw[f"{name}|{ci}|{split}|{rep}"] = st
                f.update(shape=name, config=ci, split=split, bench_tflops=flops / ms / 1e9, ms=ms,
                         traced_tflops=flops / (np.median(spans) * 1e-6) / 1e12, spans=spans)  # fmt: skip
                out.append(f)
                print(f"{name} cfg{ci} split={split}: bench {f['bench_tflops']:.0f} TFLOPS "
                      f"({ms * 1e3:.0f} us), traced spans {[round(x) for x in spans]}")  # fmt: skip
                _print(f"{name} c{ci} s{split}", f)
    if npz:
        np.savez_compressed(npz, n_sm=n_sm, **raw)
    if json_out:
        with open(json_out, "w") as fh:
            json.dump(out, fh, indent=1)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--summarize", default=None, help="saved stamps (.npz) to summarize without a GPU")
    a = parser.parse_args()
    if a.summarize:
        data = np.load(a.summarize)
        for key in data.files:
            if key != "n_sm":
                _print(key, summarize(data[key], int(data["n_sm"])))
    else:
        run(a.npz, a.json)
