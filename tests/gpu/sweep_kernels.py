"""Variant sweep on the device: correctness of each launch config against a float64 oracle (padded batch),
then do_bench medians side by side. `python tests/gpu/sweep_kernels.py` (needs a CUDA GPU); writes
$OUT/sweep.json. Shape key: B batch, T padded length, H heads, D head dim.

Variants are fixed launches through the `config` / `dkdv_config` / `dq_config` arguments of the launchers
(USE_TMA: tensor-descriptor loads; WS: Triton's warp specialization of the forward key loop; ATOMIC_DQ: the
opt-in one-pass backward, dQ
added with element atomics (1) or one bulk tensor reduce per tile (2); STORE_DS: the stored-dS backward's dSᵀ
written with pointer (1) or descriptor (2) stores). SWEEP_ONLY=fwd, bwd, 1p or ds limits the sweep to one part;
the ds part also times cuBLAS on the same streamed product (dSᵀ transposed times K) as a bandwidth reference."""

from __future__ import annotations

import collections
import json
import os
import re
import traceback

import torch
from triton.testing import do_bench

import scfm_kernels as sk
from scfm_kernels import _bwd, _common, _fwd
from scfm_kernels._bwd import attention_backward
from scfm_kernels._fwd import attention_forward

# The compiled kernel of each jit function's latest launch, so each variant's machine code can be counted.
LAST_LAUNCH: dict[str, object] = {}
KERNEL_OF = {"fwd": "_fwd_kernel", "dkdv": "_dkdv_kernel", "1p": "_dkdv_kernel", "dq": "_dq_kernel"}
KERNEL_OF["ds"] = "_dkdv_kernel"  # the stored-dS variants: the dK/dV kernel with its store (the dQ one is small)


def _capture(jit_fn) -> None:
    run = jit_fn.run

    def capturing_run(*args, **kwargs):
        kernel = run(*args, **kwargs)
        LAST_LAUNCH[jit_fn.__name__] = kernel
        return kernel

    jit_fn.run = capturing_run


for _fn in (_fwd._fwd_kernel, _bwd._dkdv_kernel, _bwd._dq_kernel, _bwd._dq_ds_kernel):
    _capture(_fn)

_SASS_OP = re.compile(r"^[^\t]*\t(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")  # "--:-:1:-:8\tFFMA R1, ..."


def _sass_counts(kernel) -> dict[str, int]:
    """Instruction mnemonics of one compiled kernel's SASS (whole kernel, prologue and epilogue included), with
    registers and spills: how many FMA-pipe and special-function issues a variant spends."""
    try:
        sass = kernel.asm["sass"]
    except Exception as exc:  # no disassembler: PTX mnemonics instead
        ptx = kernel.asm.get("ptx", "")
        c = collections.Counter(m.group(1) for m in re.finditer(r"^\s+([a-z][a-z0-9]*(?:\.[a-z0-9]+)*)", ptx, re.M))
        return {"_error": str(exc)[:80], **{k: v for k, v in c.most_common(25)}}
    ops = collections.Counter(m.group(1) for line in sass.splitlines() if (m := _SASS_OP.match(line)))
    keep = ("FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "MUFU", "IADD3", "IMAD", "F2FP", "HGMMA", "WARPGROUP")
    out = {k: ops.get(k, 0) for k in keep}
    out["total"] = sum(ops.values())
    meta = getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None)
    out["regs"], out["spills"] = (int(x) if x is not None else -1 for x in meta)
    out["smem"] = int(getattr(getattr(kernel, "metadata", None), "shared", -1) or -1)  # bytes per program
    return out


def C(bm, bn, w, s, tma=True, ws=False, sig=3):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, USE_TMA=tma, WS=ws, SIG=sig)


# SIG: the weights' sigmoid (_fwd.sigmoid_parts): 3 flush-to-zero ex2 + one centred Newton step (bfloat16's
# default), 1 the same ex2 + one third-order step (float16's default, the run-11 kernels; "sig1" rows).
FWD = {
    "tma 128x128 w8 s3 sig1": C(128, 128, 8, 3, sig=1),
    "tma 128x128 w8 s3": C(128, 128, 8, 3),
    "tma 128x128 w8 s3 ws": C(128, 128, 8, 3, ws=True),
    # One warp group per program, shared memory for two programs per multiprocessor (Q 32 KB + 2 x 32 KB of
    # K/V): their weights and products interleave without a common barrier.
    "tma 128x64 w4 s2 sig1": C(128, 64, 4, 2, sig=1),
    "tma 128x64 w4 s2": C(128, 64, 4, 2),
    "tma 128x64 w4 s3": C(128, 64, 4, 3),
    # 128 query rows per warp group: K/V loads and barriers amortised over twice the rows.
    "tma 256x64 w8 s2": C(256, 64, 8, 2),
    "tma 256x64 w8 s3": C(256, 64, 8, 3),
}
DKDV = {  # BLOCK_M queries x BLOCK_N keys; the backward's sigmoid is SIG 1 (run 12: SIG 3 cost accuracy, no speed)
    "tma 64x128 w8 s3": C(64, 128, 8, 3, sig=1),
    "tma 64x128 w8 s4": C(64, 128, 8, 4, sig=1),
    "tma 64x64 w4 s2": C(64, 64, 4, 2, sig=1),
}
DQ = {
    "tma 128x64 w8 s3": C(128, 64, 8, 3, sig=1),
    "tma 128x64 w8 s4": C(128, 64, 8, 4, sig=1),
    "tma 128x128 w8 s2": C(128, 128, 8, 2, sig=1),
}


def S(store, dkdv, dq):
    """A stored-dS backward: the dK/dV launch with its dSᵀ store (1 pointer, 2 descriptor) and the dQ-from-dS one."""
    return {**C(*dkdv, sig=1), "STORE_DS": store}, C(*dq)


STORED = {  # dq_path="stored": dK/dV also writes dSᵀ, one streamed product makes dQ (5 + 1 products, not 7)
    "ptr 64x128 w8 s3 | 128x64 w4 s4": S(1, (64, 128, 8, 3), (128, 64, 4, 4)),
    "desc 64x128 w8 s3 | 128x64 w4 s4": S(2, (64, 128, 8, 3), (128, 64, 4, 4)),
    "desc 64x128 w8 s2 | 128x64 w4 s4": S(2, (64, 128, 8, 2), (128, 64, 4, 4)),
    "ptr 64x128 w8 s2 | 128x64 w4 s4": S(1, (64, 128, 8, 2), (128, 64, 4, 4)),
    "ptr 64x64 w4 s2 | 128x64 w4 s4": S(1, (64, 64, 4, 2), (128, 64, 4, 4)),
    "ptr 64x128 w8 s3 | 128x128 w8 s3": S(1, (64, 128, 8, 3), (128, 128, 8, 3)),
    "ptr 64x128 w8 s3 | 64x128 w4 s4": S(1, (64, 128, 8, 3), (64, 128, 4, 4)),
    "ptr 64x128 w8 s3 | 128x64 w8 s3": S(1, (64, 128, 8, 3), (128, 64, 8, 3)),
    "ptr 64x128 w8 s3 | 64x64 w4 s3": S(1, (64, 128, 8, 3), (64, 64, 4, 3)),
}
ONEPASS = {  # deterministic=False: the dK/dV kernel also adds dQ (no dQ kernel)
    "reduce 64x128 w8 s3": {**C(64, 128, 8, 3, sig=1), "ATOMIC_DQ": 2},
}


K0, DQ0 = "tma 64x128 w8 s3", "tma 128x64 w8 s3"  # the other kernel's launch while one is varied
SMOKE = os.environ.get("SWEEP_SMOKE") == "1"  # CPU interpreter dry run of this script at tiny sizes
DEV = "cpu" if SMOKE else "cuda"


def _bench(fn) -> float:
    if SMOKE:
        fn()
        return 1.0
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _time_shape(times, checks, label, B, T, H, D, pad, scale) -> None:
    q, k, v, go = (torch.randn(B, T, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(4))
    lens = torch.randint(round(T * (1 - pad)), T + 1, (B,), device=DEV, dtype=torch.int32)
    if pad == 0:
        lens.fill_(T)
    bias = -torch.log(lens.float())
    flops = sum(4.0 * H * D * n * n for n in lens.tolist())
    for name, cfg in FWD.items() if os.environ.get("SWEEP_ONLY") in (None, "", "fwd") else ():
        if isinstance(checks.get(f"fwd {name}"), list):
            ms = _bench(lambda cfg=cfg: attention_forward(q, k, v, lens, bias, scale, False, T, config=cfg))
            times[f"{label} fwd {name}"] = flops / ms / 1e9
    if label != "pad4k" and os.environ.get("SWEEP_ONLY") not in ("fwd", "ds"):
        for name, cfg in ONEPASS.items():
            if isinstance(checks.get(f"1p {name}"), list):
                kw = dict(dkdv_config=cfg, deterministic=False)
                ms = _bench(lambda kw=kw: attention_backward(go, q, k, v, lens, bias, scale, False, T, **kw))
                times[f"{label} bwd[one pass] {name}"] = 2.5 * flops / ms / 1e9
    if os.environ.get("SWEEP_ONLY") in (None, "", "ds"):
        for name, (kc, qc) in STORED.items():
            if isinstance(checks.get(f"ds {name}"), list):
                kw = dict(dkdv_config=kc, dq_config=qc, dq_path="stored")
                ms = _bench(lambda kw=kw: attention_backward(go, q, k, v, lens, bias, scale, False, T, **kw))
                times[f"{label} bwd[stored dS] {name}"] = 2.5 * flops / ms / 1e9
        kw = dict(dkdv_config=DKDV[K0], dq_config=DQ[DQ0], dq_path="recompute")
        ms = _bench(lambda kw=kw: attention_backward(go, q, k, v, lens, bias, scale, False, T, **kw))
        times[f"{label} bwd[recompute, same call] {K0} | {DQ0}"] = 2.5 * flops / ms / 1e9
        if label == "dense8k" and not SMOKE:  # the streamed product through cuBLAS: dQ = (dSᵀ)ᵀ K per head
            dsT = torch.randn(B * H, T, T, device=DEV, dtype=torch.bfloat16)
            kh = k.transpose(1, 2).reshape(B * H, T, D)
            ms = _bench(lambda: torch.bmm(dsT.transpose(1, 2), kh))
            times[f"{label} cuBLAS streamed product (GB/s of dS read)"] = dsT.numel() * 2 / ms / 1e6
            del dsT
    if label != "pad4k" and os.environ.get("SWEEP_ONLY") not in ("fwd", "1p", "ds"):
        for kind, table in (("dkdv", DKDV), ("dq", DQ)):
            for name, cfg in table.items():
                if not isinstance(checks.get(f"{kind} {name}"), list):
                    continue
                if kind == "dkdv":
                    kw = dict(dkdv_config=cfg, dq_config=DQ[DQ0], dq_path="recompute")
                else:
                    kw = dict(dkdv_config=DKDV[K0], dq_config=cfg, dq_path="recompute")
                ms = _bench(lambda kw=kw: attention_backward(go, q, k, v, lens, bias, scale, False, T, **kw))
                times[f"{label} bwd[{kind} varied] {name}"] = 2.5 * flops / ms / 1e9
    for key, val in times.items():
        if key.startswith(label):
            print(f"{key}: {val:.0f} TFLOPS", flush=True)


def main() -> None:
    out_dir = os.environ.get("OUT", ".")
    res: dict[str, object] = {"device": "cpu" if SMOKE else torch.cuda.get_device_name()}
    torch.manual_seed(0)
    _common.POISON_OUTPUTS = True  # unwritten elements come out NaN
    # (a) correctness, B=2, T=4096, H=16, D=128, bf16, second sequence padded.
    B, T, H, D = (2, 160, 2, 128) if SMOKE else (2, 4096, 16, 128)
    lens = torch.tensor([T, 101 if SMOKE else 2501], device=DEV, dtype=torch.int32)
    q, k, v = (torch.randn(B, T, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    go = torch.randn(B, T, H, D, device=DEV, dtype=torch.bfloat16)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = sk.sigmoid_attention_reference(q64, k64, v64, lens)
    refs = (ref, *torch.autograd.grad(ref, (q64, k64, v64), go.double()))
    del q64, k64, v64
    bias = -torch.log(lens.float())
    scale = D**-0.5

    def err(a, r):
        if torch.isnan(a).any():
            return float("nan")
        return ((a.double() - r).norm() / r.norm()).item()

    checks: dict[str, object] = {}
    sass: dict[str, dict[str, int]] = {}
    kinds = (("fwd", FWD), ("dkdv", DKDV), ("dq", DQ), ("1p", ONEPASS), ("ds", STORED))
    only = os.environ.get("SWEEP_ONLY")
    picked = {"bwd": kinds[1:3], "fwd": kinds[:1], "1p": kinds[3:4], "ds": kinds[4:]}.get(only or "", kinds)
    for kind, table in picked:
        for name, cfg in table.items():
            try:
                if kind == "fwd":
                    o = attention_forward(q, k, v, lens, bias, scale, False, T, config=cfg)
                    e = [err(o, refs[0])]
                    e.append(max(o[b, n:].abs().max().item() if n < T else 0.0 for b, n in enumerate(lens.tolist())))
                else:
                    kw = dict(dkdv_config=cfg, dq_config=DQ[DQ0], dq_path="recompute")
                    if kind == "1p":
                        kw = dict(dkdv_config=cfg, deterministic=False)
                    if kind == "dq":
                        kw = dict(dkdv_config=DKDV[K0], dq_config=cfg, dq_path="recompute")
                    if kind == "ds":
                        kw = dict(dkdv_config=cfg[0], dq_config=cfg[1], dq_path="stored")
                    dq, dk, dv = attention_backward(go, q, k, v, lens, bias, scale, False, T, **kw)
                    e = [err(dq, refs[1]), err(dk, refs[2]), err(dv, refs[3])]
                checks[f"{kind} {name}"] = e
                if not SMOKE:
                    kernel = LAST_LAUNCH[KERNEL_OF[kind]]
                    sass[f"{kind} {name}"] = _sass_counts(kernel)
                    print(f"sass {kind} {name}: {sass[f'{kind} {name}']}", flush=True)
                    if len(sass) == 1:  # the first variant's whole SASS, for reading at leisure
                        with open(os.path.join(out_dir, "sass_first.txt"), "w") as f:
                            f.write(kernel.asm["sass"])
            except Exception as exc:
                checks[f"{kind} {name}"] = f"FAILED {type(exc).__name__}: {str(exc)[:300]}"
                traceback.print_exc()
            print(f"check {kind} {name}: {checks[f'{kind} {name}']}", flush=True)
    res["checks"] = checks
    res["sass"] = sass
    del refs

    # (b) timing: dense B=2, T=8192 and padded p=0.5 B=4, T=4096 (lengths in [T/2, T]).
    times: dict[str, float] = {}
    shapes = (("dense8k", 2, 8192, 0.0), ("pad4k", 4, 4096, 0.5))
    if os.environ.get("SWEEP_ONLY") in ("bwd", "1p"):
        shapes = shapes[:1]
    for label, B, T, pad in shapes[:1] if SMOKE else shapes:
        _time_shape(times, checks, label, B, 160 if SMOKE else T, H, D, pad, scale)
        with open(os.path.join(out_dir, "sweep.json"), "w") as f:
            json.dump({**res, "tflops": times}, f, indent=1)
    res["tflops"] = times
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("\nTFLOPS (bwd rows: one kernel varied, the other fixed at the tma default)")
    for key, val in times.items():
        print(f"{val:6.0f}  {key}")


if __name__ == "__main__":
    main()
