"""The backward's planned dK/dV launch against its 2-D grid on the GPU, in one process: for each shape of the
issue's grid asked for, the gradients of both launches must agree (to the partials' summation order where key
blocks were split), then both are timed in alternating rounds (`triton.testing.do_bench` medians); the table prints
backward TFLOPS (2.5 × the FlashAttention forward convention, padded batches credited Σ 4·H·D·nᵢ²), planned / 2-D
and padded / dense ratios. A small packed GQA batch is checked against the float64 reference first.

    PYTHONPATH=$PWD/kernels python3 tests/gpu/bwd_plan_ab.py --dims 128 --lengths 4096,8192 --pads 0,0.5 --json F
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import scfm_kernels as sk
from scfm_kernels import _bwd
from scfm_kernels.bench import _inputs, _median_ms, _module_setting, _tflops


def _check_packed_gqa() -> float:
    """Relative error of the planned backward's gradients against float64 on a packed GQA batch."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    lens = [777, 1, 0, 2048, 300]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    n, H, K, D = sum(lens), 8, 2, 128
    q, k, v = (torch.randn(n, h, D, device="cuda", generator=gen).bfloat16().requires_grad_() for h in (H, K, K))
    out = sk.sigmoid_attention_varlen(q, k, v, cu, max(lens))
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), go)
    r64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = sk.sigmoid_attention_varlen_reference(*r64, cu, max(lens))
    want = torch.autograd.grad(ref, r64, go.double())
    return max(((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="128")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--pads", default="0,0.5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.time()
    err = _check_packed_gqa()
    print(f"packed GQA, planned backward vs float64: max relative error {err:.2e}", flush=True)
    assert err < 2e-2, err
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print("   D |     L | pad  | planned | 2-D grid | plan/2-D | max rel. diff", flush=True)
    for D in map(int, args.dims.split(",")):
        for L in map(int, args.lengths.split(",")):
            for pad in map(float, args.pads.split(",")):
                B, H = 16384 // L, 2048 // D
                q, k, v, lens = _inputs(B, L, H, D, pad, gen)
                seq = None if pad == 0 else lens
                out = sk.sigmoid_attention(q, k, v, seq)
                go = torch.randn_like(out)
                flops = 2.5 * sum(4.0 * H * D * n * n for n in lens.tolist())

                def bwd(q=q, k=k, v=v, out=out, go=go):
                    return torch.autograd.grad(out, (q, k, v), go, retain_graph=True)

                with _module_setting(_bwd, "BWD_PLAN", True):
                    a = bwd()
                with _module_setting(_bwd, "BWD_PLAN", False):
                    b = bwd()
                diff = max(((x.double() - y.double()).norm() / y.double().norm()).item() for x, y in zip(a, b))
                times = {True: [], False: []}
                for _ in range(args.rounds):
                    for planned in (True, False):
                        with _module_setting(_bwd, "BWD_PLAN", planned):
                            times[planned].append(_median_ms(bwd))
                ms = {p: sorted(t)[len(t) // 2] for p, t in times.items()}
                row = dict(D=D, L=L, B=B, H=H, pad=pad, lens=lens.tolist(), diff=diff,
                           planned_ms=times[True], whole_ms=times[False],
                           planned=_tflops(flops, ms[True]), whole=_tflops(flops, ms[False]))  # fmt: skip
                rows.append(row)
                print(f"{D:>4} | {L:>5} | {pad:.2f} | {row['planned']:>7.0f} | {row['whole']:>8.0f} | "
                      f"{row['planned'] / row['whole']:>8.3f} | {diff:.1e}", flush=True)  # fmt: skip
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(dict(packed_gqa_err=err, rows=rows, seconds=time.time() - t0), f, indent=1)
                del q, k, v, out, go, a, b
    for D in sorted({r["D"] for r in rows}):
        for L in sorted({r["L"] for r in rows if r["D"] == D}):
            dense = [r for r in rows if (r["D"], r["L"], r["pad"]) == (D, L, 0.0)]
            for r in (r for r in rows if (r["D"], r["L"]) == (D, L) and r["pad"] > 0 and dense):
                print(f"D={D} L={L} p={r['pad']}: padded/dense planned {r['planned'] / dense[0]['planned']:.3f}, "
                      f"2-D grid {r['whole'] / dense[0]['whole']:.3f}")  # fmt: skip
    assert all(r["diff"] < 4e-3 for r in rows), "planned and 2-D grid gradients differ"


if __name__ == "__main__":
    main()
