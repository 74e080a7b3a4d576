"""Every launch of the warp-specialized lists timed at fixed shapes on the GPU: the forward (`_fwd_ws`; fwdN planned,
fwdNw one program per tile), the stored-dS backward with the warp-specialized dK/dV kernel (`_bwd_ws`; bwdN) and
its one-pass form (deterministic=False; 1pN, at `_bwd_ws.ONE_PASS_HEAD_DIMS`), each launch fixed (no autotuner),
with cuDNN softmax (SDPA) on the dense shapes in the same process. Correctness of the same launches is
tests/gpu/test_kernels_gpu.py's. Prints one line per shape; --json writes them.

    PYTHONPATH=$PWD/kernels python3 tests/gpu/probe_ws.py [--json out.json] [--dims 128,64] [--bwd-sig 1,3]

Shapes: the bench's (B = 16384/L, H = 2048/D), dense and padded with the bench's own lengths (BENCH_LENS), and the
trainer's 160M step at D = 128 (B = 8, H = 6, L = 8K). TFLOPS as the bench counts them.
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from scfm_kernels import _bwd_ws, _fwd, _fwd_ws
from scfm_kernels._bwd import attention_backward


def _ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


# The bench's padded lengths (its seed-0 draws on the H200, docs/benchmarks.md run 16), so both see one batch.
BENCH_LENS = {
    (128, 4096, 0.25): [3839, 3597, 3812, 4088], (128, 4096, 0.5): [3365, 2846, 2185, 3720],
    (128, 8192, 0.5): [5643, 5610], (128, 16384, 0.5): [9896], (64, 16384, 0.5): [11867],
}  # fmt: skip


def _shapes(D: int) -> list[tuple[str, int, int, int, float]]:
    H = 2048 // D
    if D == 64:
        return [("8K", 2, 8192, H, 0.0), ("16K", 1, 16384, H, 0.0), ("16K p.5", 1, 16384, H, 0.5)]
    rows = [("4K", 4, 4096, H, 0.0), ("4K p.25", 4, 4096, H, 0.25), ("4K p.5", 4, 4096, H, 0.5)]
    rows += [("8K", 2, 8192, H, 0.0), ("8K p.5", 2, 8192, H, 0.5), ("16K", 1, 16384, H, 0.0)]
    return [*rows, ("16K p.5", 1, 16384, H, 0.5), ("trainer", 8, 8192, 6, 0.0)]


def time_shape(
    D: int,
    name: str,
    B: int,
    L: int,
    H: int,
    pad: float,
    gen: torch.Generator,
    backward: bool = True,
    bwd_sigs: tuple[int, ...] = (1,),
    forward: bool = True,
) -> dict:
    q, k, v, go = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
    if pad:
        lens = torch.tensor(BENCH_LENS[(D, L, pad)], device="cuda", dtype=torch.int32)
    flops = sum(4.0 * H * D * n * n for n in lens.tolist())
    bias, scale = -torch.log(lens.float()), D**-0.5
    row: dict = {"D": D, "shape": name, "B": B, "L": L, "H": H, "lens": lens.tolist()}
    for i, cfg in enumerate(_fwd_ws.fwd_ws_configs(D) if forward else []):
        for split, tag in ((1, ""), (0, "w")):
            c = dict(cfg, KERNEL="ws", SPLIT=split)
            fn = lambda c=c: _fwd.attention_forward(q, k, v, lens, bias, scale, False, L, config=c)  # noqa: E731
            row[f"fwd{i}{tag}"] = flops / _ms(fn) / 1e9
    for i, cfg in enumerate(_bwd_ws.dkdv_ws_configs(D) if backward else []):
        for sig in bwd_sigs:  # bwdN: the default reciprocal step (SIG=1); bwdNs3: SIG=3
            fn = lambda c=dict(cfg, KERNEL="ws", SIG=sig): attention_backward(  # noqa: E731
                go, q, k, v, lens, bias, scale, False, L, dkdv_config=c, dq_path="stored"
            )
            row[f"bwd{i}" + ("" if sig == 1 else f"s{sig}")] = 2.5 * flops / _ms(fn) / 1e9
    for i, cfg in enumerate(_bwd_ws.one_pass_configs(D) if backward else []):  # 1pN: deterministic=False
        fn = lambda c=dict(cfg, KERNEL="ws"): attention_backward(  # noqa: E731
            go, q, k, v, lens, bias, scale, False, L, dkdv_config=c, dq_path="one_pass"
        )
        row[f"1p{i}"] = 2.5 * flops / _ms(fn) / 1e9
        # The same launch with element atomics (1pNa, ONE_PASS=2), with its reduces waited for a block later (1pNd,
        # ONE_PASS=3) instead of the compiler's staged reduce, and with one share per block over both consumers'
        # keys (1pNp, ONE_PASS=4).
        for tag, mode in (("a", 2), ("d", 3), ("p", 4)):
            fn = lambda c=dict(cfg, KERNEL="ws", ONE_PASS=mode): attention_backward(  # noqa: E731
                go, q, k, v, lens, bias, scale, False, L, dkdv_config=c, dq_path="one_pass"
            )
            row[f"1p{i}{tag}"] = 2.5 * flops / _ms(fn) / 1e9
    if pad == 0:
        qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
            row["cudnn_fwd"] = flops / _ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)) / 1e9
            if not backward:
                return row
            gt = go.transpose(1, 2)
            ms = _ms(lambda: torch.autograd.grad(out, (qt, kt, vt), gt, retain_graph=True))
            row["cudnn_bwd"] = 2.5 * flops / ms / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--dims", default="128,64")
    parser.add_argument("--forward-only", action="store_true", help="time the forward launches only")
    parser.add_argument("--backward-only", action="store_true", help="time the backward launches only")
    parser.add_argument("--bwd-sig", default="1", help="dK/dV reciprocal steps to time (comma list of 1, 3)")
    parser.add_argument("--shapes", default="", help="only these shapes (comma list of names, e.g. '8K,16K p.5')")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    for D in (int(d) for d in args.dims.split(",")):
        for i, c in enumerate(_fwd_ws.fwd_ws_configs(D)):
            print(f"D={D} fwd{i}: {c}")
        for i, c in enumerate(_bwd_ws.dkdv_ws_configs(D)):
            print(f"D={D} bwd{i}: {c}")
        for i, c in enumerate(_bwd_ws.one_pass_configs(D)):
            print(f"D={D} 1p{i}: {c}")
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(2)
    sigs = tuple(int(x) for x in args.bwd_sig.split(","))
    wanted = {x.strip() for x in args.shapes.split(",") if x.strip()}
    for D in (int(d) for d in args.dims.split(",")):
        for shape in [s for s in _shapes(D) if not wanted or s[0] in wanted]:
            row = time_shape(
                D, *shape, gen, backward=not args.forward_only, bwd_sigs=sigs, forward=not args.backward_only
            )
            rows.append(row)
            cells = [f"{k}={v:.0f}" for k, v in row.items() if isinstance(v, float)]
            print(f"D={D} {row['shape']:>8} lens={row['lens'][:4]} " + " ".join(cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
