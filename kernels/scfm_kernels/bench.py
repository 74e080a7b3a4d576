"""Benchmark: `python -m scfm_kernels.bench [--quick] [--out DIR] [--no-compare]` (needs a CUDA GPU).

    python -m scfm_kernels.bench --dims 128 --lengths 8192,16384 --pads 0 --ts-dims "" --no-sigmoid-study
        # a subset: D = 128 dense at 8K and 16K, with SDPA but without TritonSigmoid
    python -m scfm_kernels.bench --dims 128 --lengths 8192,16384 --pads 0 --ts-dims "" --rounds 5
        # the same, every kernel timed in 5 rounds taken in turn, medians (the card's clock drifts under load)
    python -m scfm_kernels.bench --dims 128 --ts-dims 128 --rounds 3 --targets-only --no-sigmoid-study
        # the grid the targets read (ours, TritonSigmoid, cuDNN), each timed in 3 rounds taken in turn

Shapes: bf16, D ∈ {64, 128}, L ∈ {4096, 8192, 16384}, B = 16384 / L, H = 2048 / D, dense and 25% / 50%
padded (lengths uniform in [L(1 − p), L]). `ours_bwd`: the default backward (dQ from the stored dS where it
fits the scratch budget); `ours_bwd_rc`: the recompute backward (SCFM_KERNELS_DS_SCRATCH_MIB=0, no scratch);
`ours_bwd_1p`: the opt-in one-pass backward (deterministic=False); `ours_bwd_tr`: the stored path with the
Triton dK/dV kernel (SCFM_KERNELS_BWD=triton) where that path is its default too (D = 128); `ours_fwd_whole`: the
forward without the planned launch (SCFM_KERNELS_TAIL_SPLIT=0: one program per tile in a 2-D grid, no tail split,
no longest-first order; `_split`); `ours_bwd_plan` / `ours_bwd_whole`: the backward with its dK/dV launch
planned (longest first, the last round's key blocks split over the queries) or in the 2-D grid, whichever
SCFM_KERNELS_BWD_PLAN does not choose. TFLOPS use the FlashAttention convention: 4·B·H·L²·D forward, 2.5× that
backward; padded batches credit Σᵢ 4·H·D·nᵢ². Times are `triton.testing.do_bench` medians.
Side by side, at the same bias: PyTorch SDPA (flash and cuDNN backends, softmax, dense shapes only) and
TritonSigmoid (the `triton_sigmoid` package, when importable). Also measures the exact sigmoid against the
hardware-tanh form: error at realistic logits and forward speed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from . import _bwd, _bwd_ws, _fwd, _fwd_ws, sigmoid_attention
from ._fwd import attention_forward
from ._tile import sigmoid_from_log2

Row = dict[str, object]


@contextlib.contextmanager
def _scratch_mib(value: str):
    """SCFM_KERNELS_DS_SCRATCH_MIB=value inside the block (the backward reads it at every call)."""
    old = os.environ.get("SCFM_KERNELS_DS_SCRATCH_MIB")
    os.environ["SCFM_KERNELS_DS_SCRATCH_MIB"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["SCFM_KERNELS_DS_SCRATCH_MIB"]
        else:
            os.environ["SCFM_KERNELS_DS_SCRATCH_MIB"] = old


@contextlib.contextmanager
def _module_setting(module, name: str, value):
    """module.name = value inside the block: a kernel choice its launcher reads at every call, e.g. `_bwd.BWD_KERNEL`
    (SCFM_KERNELS_BWD) or `_fwd_ws.TAIL_SPLIT` (SCFM_KERNELS_TAIL_SPLIT)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _median_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def _inputs(B: int, L: int, H: int, D: int, pad: float, gen: torch.Generator):
    dev = "cuda"
    q, k, v = (
        torch.randn(B, L, H, D, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_() for _ in range(3)
    )
    lo = round(L * (1 - pad))
    lens = torch.randint(lo, L + 1, (B,), device=dev, generator=gen, dtype=torch.int32)
    if pad == 0:
        lens.fill_(L)
    return q, k, v, lens


def _triton_sigmoid(full_autotune: bool):
    """The TritonSigmoid package, or None. Unless full_autotune, its autotuners keep only the 64- and
    128-wide tiles of its own Hopper config lists (its 32-wide tiles and 4-stage configs are dropped) so
    that tuning it takes a couple of minutes rather than many."""
    try:
        import triton_sigmoid
        from triton_sigmoid import sigmoid_triton_dense, sigmoid_triton_padded
    except Exception as exc:
        print(f"TritonSigmoid not importable ({exc}); its columns stay empty")
        return None
    if not full_autotune:
        for mod in (sigmoid_triton_dense, sigmoid_triton_padded):
            for obj in vars(mod).values():
                if isinstance(obj, triton.runtime.Autotuner):
                    kept = [
                        c
                        for c in obj.configs
                        if min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= 64 and c.num_stages <= 3
                    ]
                    obj.configs = kept or obj.configs
    return triton_sigmoid


@dataclasses.dataclass
class _Variant:
    """One kernel to time at a shape: fn() runs its forward on `inputs`; fwd / bwd name the row's columns for its
    forward and backward TFLOPS (None: not timed); setting() is the context it runs in (a module setting); a
    variant with a `backend` name may be missing from the build: its error goes to the row as "<backend>_error"."""

    fn: Callable[[], torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    fwd: str | None
    bwd: str | None
    setting: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    backend: str | None = None


def _time_variant(v: _Variant) -> dict[str, float]:
    """Median ms of the variant's forward and/or backward (a retained graph's `torch.autograd.grad`)."""
    with v.setting():
        out = v.fn()
        times = {}
        if v.fwd:
            times[v.fwd] = _median_ms(v.fn)
        if v.bwd:
            go = torch.randn_like(out)
            times[v.bwd] = _median_ms(lambda: torch.autograd.grad(out, v.inputs, go, retain_graph=True))
    return times


def _variants(
    q, k, v, lens, seq, L: int, D: int, ts, ts_dims, compare: bool, alt_dkdv: bool, targets_only: bool = False
) -> list[_Variant]:
    """What the bench times at one shape (module docstring), in the order it times them; targets_only: only the
    columns the targets read (ours, TritonSigmoid, cuDNN)."""
    qkv = (q, k, v)
    ours = lambda q=q, k=k, v=v, s=seq: sigmoid_attention(q, k, v, s)  # noqa: E731
    out = [_Variant(ours, qkv, "ours_fwd", "ours_bwd")]
    if targets_only:
        return out + _baselines(q, k, v, lens, seq, L, D, ts, ts_dims, compare, ("cudnn",))
    if _fwd_ws.supported(q, True) and _fwd_ws.TAIL_SPLIT:  # the same forward, not planned
        out.append(_Variant(ours, qkv, "ours_fwd_whole", None, lambda: _module_setting(_fwd_ws, "TAIL_SPLIT", False)))
    # The same backward with the dK/dV launch the other way (planned or the 2-D grid) than the default.
    other = "ours_bwd_whole" if _bwd.BWD_PLAN else "ours_bwd_plan"
    out.append(_Variant(ours, qkv, None, other, lambda: _module_setting(_bwd, "BWD_PLAN", not _bwd.BWD_PLAN)))
    one_pass = lambda q=q, k=k, v=v, s=seq: sigmoid_attention(q, k, v, s, deterministic=False)  # noqa: E731
    out.append(_Variant(one_pass, qkv, None, "ours_bwd_1p"))
    # No scratch for dS: the dQ kernel recomputes it (the "recompute" path).
    out.append(_Variant(ours, qkv, None, "ours_bwd_rc", lambda: _scratch_mib("0")))
    # Where the stored path is the default with either dK/dV kernel (D = 128): the Triton one.
    if alt_dkdv and _bwd_ws.supported(q, True) and _bwd.pick_dq_path(True, True, 1, D, L, 2, 2**40)[0] == "stored":
        out.append(_Variant(ours, qkv, None, "ours_bwd_tr", lambda: _module_setting(_bwd, "BWD_KERNEL", "triton")))
    return out + _baselines(q, k, v, lens, seq, L, D, ts, ts_dims, compare, ("flash", "cudnn"))


def _baselines(q, k, v, lens, seq, L: int, D: int, ts, ts_dims, compare: bool, sdpa_backends: tuple[str, ...]):
    """TritonSigmoid (at ts_dims) and the SDPA softmax backends named (dense shapes only), as bench variants."""
    qkv = (q, k, v)
    out: list[_Variant] = []
    if ts is not None and D in ts_dims:
        if seq is None:
            ts_fn = lambda q=q, k=k, v=v, L=L: ts.sigmoid_attention(q, k, v, sigmoid_bias=-math.log(L))  # noqa: E731
        else:
            ts_fn = lambda q=q, k=k, v=v, s=lens: ts.sigmoid_attention_padded(  # noqa: E731
                q, k, v, seq_lens_k=s, seq_lens_q=s
            )
        out.append(_Variant(ts_fn, qkv, "ts_fwd", "ts_bwd"))
    if compare and seq is None:
        qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in qkv)
        sdpa = lambda qt=qt, kt=kt, vt=vt: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
        backends = {"flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
                    "cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION}  # fmt: skip
        for name in sdpa_backends:
            backend = backends[name]
            setting = lambda b=backend: torch.nn.attention.sdpa_kernel(b)  # noqa: E731
            out.append(_Variant(sdpa, (qt, kt, vt), f"{name}_fwd", f"{name}_bwd", setting, backend=name))
    return out


def run_table(
    quick: bool,
    compare: bool,
    ts_dims: tuple[int, ...],
    ts_full: bool,
    dims: tuple[int, ...] = (64, 128),
    lengths: tuple[int, ...] = (4096, 8192, 16384),
    pads: tuple[float, ...] = (0.0, 0.25, 0.5),
    alt_dkdv: bool = True,
    rounds: int = 1,
    targets_only: bool = False,
) -> list[Row]:
    """One row per shape. With rounds > 1 every variant of every shape of one (D, L) — dense and padded — is timed
    once per round, the shapes and their variants in turn within a round (so the card's clock, which drifts under
    load, weighs on the padded/dense ratios and on the baselines alike); each column is the median of its rounds,
    and the rounds' times are kept under "rounds_ms"."""
    ts = _triton_sigmoid(ts_full) if compare and ts_dims else None
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows: list[Row] = []
    for D in dims:
        for L in [n for n in lengths if n <= 8192] if quick else lengths:
            shapes = []  # (row, variants, credited flops, times) per padding fraction
            for pad in pads:
                B, H = 16384 // L, 2048 // D
                q, k, v, lens = _inputs(B, L, H, D, pad, gen)
                flops = sum(4.0 * H * D * n * n for n in lens.tolist())
                seq = None if pad == 0 else lens
                row: Row = {"D": D, "L": L, "B": B, "H": H, "pad": pad, "lens": lens.tolist()}
                variants = _variants(q, k, v, lens, seq, L, D, ts, ts_dims, compare, alt_dkdv, targets_only)
                shapes.append((row, variants, flops, {}))
            for _ in range(rounds):
                for row, variants, _, times in shapes:
                    for variant in list(variants):
                        try:
                            for col, ms in _time_variant(variant).items():
                                times.setdefault(col, []).append(ms)
                        except Exception as exc:  # an SDPA backend missing on this build
                            if variant.backend is None:
                                raise
                            row[f"{variant.backend}_error"] = str(exc)[:120]
                            variants.remove(variant)
            for row, variants, flops, times in shapes:
                forward = {variant.fwd for variant in variants}
                for col, ms in times.items():
                    median = sorted(ms)[len(ms) // 2]
                    row[col] = _tflops(flops if col in forward else 2.5 * flops, median)
                if rounds > 1:
                    row["rounds_ms"] = times
                rows.append(row)
                print(_format_row(row), flush=True)
            del shapes
    return rows


_COLS = [
    "ours_fwd",
    "ours_fwd_whole",
    "ours_bwd",
    "ours_bwd_whole",
    "ours_bwd_plan",
    "ours_bwd_rc",
    "ours_bwd_tr",
    "ours_bwd_1p",
    "ts_fwd",
    "ts_bwd",
    "cudnn_fwd",
    "cudnn_bwd",
    "flash_fwd",
    "flash_bwd",
]


def _format_row(row: Row) -> str:
    cells = [f"{row['D']:>4}", f"{row['L']:>6}", f"{row['B']:>3}", f"{row['H']:>3}", f"{row['pad']:>5.2f}"]
    cells += [f"{row[c]:>7.0f}" if c in row else f"{'-':>7}" for c in _COLS]
    for num, den in (("ours_fwd", "ts_fwd"), ("ours_bwd", "ts_bwd"), ("ours_bwd", "cudnn_bwd")):
        cells.append(f"{row[num] / row[den]:>6.2f}" if den in row else f"{'-':>6}")
    return " | ".join(cells)


HEADER = " | ".join(
    ["   D", "     L", "  B", "  H", "  pad"] + [f"{c:>7}" for c in _COLS] + ["fwd/ts", "bwd/ts", "bwd/cudnn"]
)


@triton.jit
def _sigmoid_probe(X, DIV, CUBIC, NEWTON, FAST, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    z = -tl.load(X + offs, mask=offs < N) * 1.4426950408889634
    tl.store(DIV + offs, 1.0 / (1.0 + tl.exp2(z)), mask=offs < N)
    tl.store(CUBIC + offs, sigmoid_from_log2(z, False, SIG=1), mask=offs < N)
    tl.store(NEWTON + offs, sigmoid_from_log2(z, False, SIG=3), mask=offs < N)
    tl.store(FAST + offs, sigmoid_from_log2(z, True), mask=offs < N)


def sigmoid_study() -> dict[str, object]:
    """Error at realistic logits of four sigmoids: ex2 + hardware reciprocal ("div"), flush-to-zero ex2 + one
    third-order FMA-pipe reciprocal step ("cubic", the float16 kernels'), the same ex2 + one centred Newton step
    ("newton", the bfloat16 kernels') and the tanh.approx form ("tanh"); then the attention-level error and
    forward speed of the bfloat16 kernel with its default sigmoid vs tanh."""
    out: dict[str, object] = {}
    gen = torch.Generator(device="cuda").manual_seed(1)
    for n_keys in (1024, 8192, 16384):
        for spread in (1.0, 3.0):
            x = torch.randn(1 << 22, device="cuda", generator=gen) * spread - math.log(n_keys)
            got = {name: torch.empty_like(x) for name in ("div", "cubic", "newton", "tanh")}
            _sigmoid_probe[(triton.cdiv(x.numel(), 1024),)](
                x, got["div"], got["cubic"], got["newton"], got["tanh"], x.numel(), BLOCK=1024
            )
            ref = torch.sigmoid(x.double())
            for name, val in got.items():
                rel = ((val.double() - ref).abs() / ref).float()
                out[f"{name} n={n_keys} sd={spread} rel_err median/max"] = (rel.median().item(), rel.max().item())
    # Attention-level error and speed, d=128, bf16, with the −log(n) bias.
    B, T, H, D = 1, 4096, 4, 128
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    lens = torch.full((B,), T, device="cuda", dtype=torch.int32)
    bias = torch.full((B,), -math.log(T), device="cuda")
    scale = D**-0.5
    ref = _attention_f64(q, k, v, -math.log(T), scale)
    for name, fast in (("default", False), ("tanh", True)):
        o = attention_forward(q, k, v, lens, bias, scale, False, T, fast_sigmoid=fast)
        out[f"{name} attention rel_err (bf16 out)"] = ((o.double() - ref).norm() / ref.norm()).item()
    B, T, H = 2, 8192, 16
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    lens = torch.full((B,), T, device="cuda", dtype=torch.int32)
    bias = torch.full((B,), -math.log(T), device="cuda")
    for name, fast in (("default", False), ("tanh", True)):
        ms = _median_ms(lambda f=fast: attention_forward(q, k, v, lens, bias, scale, False, T, fast_sigmoid=f))
        out[f"{name} fwd TFLOPS d=128 L=8192"] = _tflops(4.0 * B * H * T * T * D, ms)
    return out


def _attention_f64(q, k, v, bias: float, scale: float) -> torch.Tensor:
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))
    p = torch.sigmoid(q64 @ k64.transpose(-1, -2) * scale + bias)
    return (p @ v64).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="L ∈ {4096, 8192} only")
    parser.add_argument("--no-compare", action="store_true", help="skip SDPA and TritonSigmoid")
    parser.add_argument("--ts-dims", default="64,128", help="head dims at which to run TritonSigmoid")
    parser.add_argument("--ts-full-autotune", action="store_true", help="TritonSigmoid with all its configs")
    parser.add_argument("--no-sigmoid-study", action="store_true", help="skip the exact-vs-tanh study")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench.json")
    parser.add_argument("--dims", default="64,128", help="head dims (comma list)")
    parser.add_argument("--lengths", default="4096,8192,16384", help="padded lengths L (comma list)")
    parser.add_argument("--pads", default="0,0.25,0.5", help="padding fractions (comma list)")
    parser.add_argument("--no-alt-dkdv", action="store_true", help="skip the ours_bwd_tr column")
    parser.add_argument(
        "--targets-only",
        action="store_true",
        help="time only the columns the targets read: ours, TritonSigmoid and cuDNN (no alternative launches, no flash)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="time every variant this many times, in turn; report the medians"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("scfm_kernels.bench needs a CUDA GPU; none is visible to torch.")
    os.makedirs(args.out, exist_ok=True)  # before the timing, so that its results have somewhere to go
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    result: dict[str, object] = {"device": torch.cuda.get_device_name()}
    if not args.no_sigmoid_study:
        study = sigmoid_study()
        for key, val in study.items():
            print(f"sigmoid study: {key}: {val}")
        result["sigmoid_study"] = study
    print(HEADER, flush=True)
    ts_dims = tuple(int(d) for d in args.ts_dims.split(",") if d)
    dims = tuple(int(d) for d in args.dims.split(",") if d)
    lengths = tuple(int(n) for n in args.lengths.split(",") if n)
    pads = tuple(float(x) for x in args.pads.split(",") if x)
    rows = run_table(
        args.quick,
        not args.no_compare,
        ts_dims,
        args.ts_full_autotune,
        dims,
        lengths,
        pads,
        not args.no_alt_dkdv,
        max(1, args.rounds),
        args.targets_only,
    )
    result["rows"] = rows
    print("\n" + HEADER)
    for row in rows:
        print(_format_row(row))
    for D in dims:
        for L in sorted({r["L"] for r in rows}):
            dense = next((r for r in rows if r["D"] == D and r["L"] == L and r["pad"] == 0), None)
            if dense is None:
                continue
            for r in rows:
                if r["D"] == D and r["L"] == L and r["pad"] > 0:
                    print(
                        f"padded/dense D={D} L={L} pad={r['pad']}: fwd {r['ours_fwd'] / dense['ours_fwd']:.2f} "
                        f"bwd {r['ours_bwd'] / dense['ours_bwd']:.2f}"
                    )
    tuned = {}
    tuners = (("fwd", _fwd._fwd_tuned), ("fwd_ws", _fwd_ws._tuned), ("dkdv", _bwd._dkdv_tuned),
              ("dkdv_ws", _bwd_ws._tuned), ("dq", _bwd._dq_tuned))  # fmt: skip
    for name, tuner in tuners:
        for key, cfg in getattr(tuner, "cache", {}).items():
            tuned[f"{name} {key}"] = str(cfg)
            print(f"chosen config {name} {key}: {cfg}")
    result["chosen_configs"] = tuned
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
