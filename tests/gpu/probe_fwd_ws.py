"""The warp-specialized forward (`_fwd_ws`) on the GPU: every launch of its list checked against float64, then timed
against the Triton forward (autotuned) and cuDNN softmax in the same process. Prints a table; --json writes it.

    PYTHONPATH=$PWD/kernels python3 tests/gpu/probe_fwd_ws.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

import scfm_kernels as sk
from scfm_kernels import _common, _fwd, _fwd_ws

# The autotuner's launches and a few more (none spills registers: ptxas, sm_90).
SWEEP = {
    d: _fwd_ws.fwd_ws_configs(d) + [dict(c, NUM_CONSUMERS=2, CONSUMER_REGS=232) for c in _fwd_ws.fwd_ws_configs(d)[:1]]
    for d in _fwd_ws.HEAD_DIMS
}


def _fwd_call(q, k, v, lens, config=None):
    T, D = q.shape[1], q.shape[3]
    return _fwd.attention_forward(q, k, v, lens, -torch.log(lens.float()), D**-0.5, False, T, config=config)


def check() -> list[str]:
    """Every listed launch, padded (lengths T, 1, T/2 + 3) with GQA, and packed, against float64."""
    lines = []
    _common.POISON_OUTPUTS = True  # unwritten rows show as NaN
    gen = torch.Generator(device="cuda").manual_seed(0)
    for D in _fwd_ws.HEAD_DIMS:
        B, T, H, K = 3, 2048, 4, 2
        lens = torch.tensor([T, 1, T // 2 + 3], device="cuda", dtype=torch.int32)
        q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(B, T, K, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        ref = sk.sigmoid_attention_reference(q.double(), k.double(), v.double(), lens)
        cu = torch.tensor([0, 700, 701, 2000], device="cuda", dtype=torch.int32)
        qp, kp, vp = q[0, :2000].contiguous(), k[0, :2000].contiguous(), v[0, :2000].contiguous()
        ref_p = sk.sigmoid_attention_varlen_reference(qp.double(), kp.double(), vp.double(), cu, 1299)
        for cfg in SWEEP[D]:
            out = _fwd_call(q, k, v, lens, dict(KERNEL="ws", **cfg))
            err = ((out.double() - ref).norm() / ref.norm()).item()
            pad_ok = all(bool(torch.all(out[b, n:] == 0)) for b, n in enumerate(lens.tolist()))
            nan = bool(torch.isnan(out).any())
            bias = -torch.log((cu[1:] - cu[:-1]).float())
            outp = _fwd.attention_forward(qp, kp, vp, cu, bias, D**-0.5, True, 1299, config=dict(KERNEL="ws", **cfg))
            err_p = ((outp.double() - ref_p).norm() / ref_p.norm()).item()
            ok = err < 2e-2 and err_p < 2e-2 and pad_ok and not nan
            lines.append(
                f"check D={D} {cfg}: padded rel err {err:.2e}, packed {err_p:.2e}, padding zero {pad_ok}, "
                f"NaN {nan} -> {'OK' if ok else 'FAIL'}"
            )
            print(lines[-1], flush=True)
    return lines


def _ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _time_shape(D: int, L: int, pad: float, gen: torch.Generator) -> dict:
    B, H = 16384 // L, 2048 // D
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    lens = torch.full((B,), L, device="cuda", dtype=torch.int32)
    if pad:
        lens = torch.randint(round(L * (1 - pad)), L + 1, (B,), device="cuda", dtype=torch.int32, generator=gen)
    flops = sum(4.0 * H * D * n * n for n in lens.tolist())
    row = {"D": D, "L": L, "pad": pad}
    old = _fwd.FWD_KERNEL
    _fwd.FWD_KERNEL = "triton"
    row["triton"] = flops / _ms(lambda: _fwd_call(q, k, v, lens)) / 1e9
    _fwd.FWD_KERNEL = old
    row["ws_tuned"] = flops / _ms(lambda: _fwd_call(q, k, v, lens)) / 1e9
    for i, cfg in enumerate(SWEEP[D]):
        row[f"ws{i}"] = flops / _ms(lambda c=cfg: _fwd_call(q, k, v, lens, dict(KERNEL="ws", **c))) / 1e9
    if pad == 0:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            row["cudnn"] = flops / _ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)) / 1e9
    return row


def timing(quick: bool) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(128, 8192, 0.0), (128, 8192, 0.25), (128, 16384, 0.0), (64, 8192, 0.0)]
    for D, L, pad in shapes[:2] if quick else shapes:
        row = _time_shape(D, L, pad, gen)
        rows.append(row)
        print(" | ".join(f"{k}={v:.0f}" if isinstance(v, float) and k != "pad" else f"{k}={v}" for k, v in row.items()))
    for key, cfg in getattr(_fwd_ws._tuned, "cache", {}).items():
        print(f"chosen ws config {key}: {cfg}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    result = {"check": check()}
    if not args.no_timing:
        result["timing"] = timing(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
