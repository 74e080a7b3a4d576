"""Small shared pieces: interpreter detection, head-dim padding, output allocation."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton

# Triton decides at decoration time whether a @triton.jit function runs in its CPU interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# SCFM_KERNELS_AUTOTUNE=0 skips autotuning and launches each kernel with its first fitting config (tests).
AUTOTUNE = os.environ.get("SCFM_KERNELS_AUTOTUNE", "1") != "0"

# Tests set this to True: every kernel output is then filled with NaN before the launch, so a row the
# kernel fails to write shows up as NaN instead of as a plausible stale value.
POISON_OUTPUTS = False


def block_d(head_dim: int) -> int:
    """Head dim padded to the next power of two (at least 16); the kernels mask the extra columns."""
    return max(16, triton.next_power_of_2(head_dim))


def len_bucket(t_max: int) -> int:
    """The autotuners' length key: the padded length rounded up to a power of two in [1024, 65536], so a
    training run with varying batch lengths retunes a handful of times, not once per length."""
    return min(65536, max(1024, triton.next_power_of_2(max(1, t_max))))


def new_output(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def dot_mode(dtype: torch.dtype) -> int:
    """How the kernels multiply tiles: 0 native half-precision tensor-core products, 1 IEEE float32 products
    (float32 inputs), 2 half inputs widened to float32 first (the interpreter's bfloat16 products are wrong)."""
    if dtype == torch.float32:
        return 1
    return 2 if INTERPRET else 0


def sigmoid_mode(dtype: torch.dtype) -> int:
    """Which reciprocal the forward kernel's sigmoid uses (`_tile.sigmoid_parts`): 3, one centred Newton step
    (relative error ≤ 1.3e-3, a third of a bfloat16 ulp) for bfloat16; 1, one third-order step (≤ 1.3e-4, under
    half an fp16 ulp) for float16; float32 divides exactly whatever this says. The backward always uses 1."""
    return 3 if dtype == torch.bfloat16 else 1


def tma_ok(*ts: torch.Tensor) -> bool:
    """Whether the kernels may read these [.., T, H, D] tensors through tensor descriptors (TMA): 16-bit
    dtype, 16-byte aligned base and strides, last dim contiguous. Otherwise they use pointer loads."""
    for t in ts:
        if t.dtype not in (torch.float16, torch.bfloat16) or t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((s * t.element_size()) % 16 for s in t.stride()[:-1]):
            return False
    return INTERPRET or (ts[0].is_cuda and torch.cuda.get_device_capability(ts[0].device)[0] >= 9)


def ds_scratch_bytes(device: torch.device) -> int:
    """Bytes the backward may hold for its stored dSᵀ (`_bwd.attention_backward`, path "stored"):
    SCFM_KERNELS_DS_SCRATCH_MIB if set (0 turns the stored path off), else 1/16 of the GPU's memory (8.7 GiB on
    an H200); 256 MiB under the CPU interpreter."""
    env = os.environ.get("SCFM_KERNELS_DS_SCRATCH_MIB")
    if env is not None:
        try:
            mib = float(env)
        except ValueError:
            raise ValueError(
                f"SCFM_KERNELS_DS_SCRATCH_MIB={env!r}: expected a number of MiB (0 turns it off)"
            ) from None
        return max(0, int(mib * 2**20))
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 16
    return 256 * 2**20


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def for_head_dim(launches: list[dict], head_dim: int | None) -> list[dict]:
    """The launches of a list whose DIMS (the head dims each serves) hold head_dim (all for None), DIMS dropped."""
    return [{k: v for k, v in c.items() if k != "DIMS"} for c in launches if head_dim is None or head_dim in c["DIMS"]]


def head_dim_autotuner(
    kernel, configs_for: Callable[[int | None], list[dict]], key: list[str], reset_to_zero: list[str] | None = None
):
    """An autotuner of a warp-specialized kernel (four warps per partition) over every distinct launch of
    configs_for(None); each call keeps those of configs_for(HEAD_DIM) in that list's order, so the first of its list
    is the one SCFM_KERNELS_AUTOTUNE=0 launches, and a launch two head dims share is timed once. reset_to_zero: the
    arguments zeroed before each timing launch (buffers the kernel adds into)."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        mine = configs_for(kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM")))
        kept = [next(c for c in configs if c.kwargs == m) for m in mine]
        return kept if AUTOTUNE else kept[:1]

    distinct: list[dict] = []
    for c in configs_for(None):
        if c not in distinct:
            distinct.append(c)
    configs = [triton.Config(c, num_warps=4) for c in distinct]
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, reset_to_zero=reset_to_zero
    )(kernel)


def set_descriptor_allocator() -> None:
    """Device-side tensor descriptors need a small global scratch buffer per launch (Triton's allocator)."""
    triton.set_allocator(_scratch)


# The kernels' pointer arguments by name: 16-bit data, but for these.
_DATA_POINTERS = ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ", "DS")
_POINTER_TYPES = {"SEQ": "*i32", "BIAS": "*fp32", "DQA": "*fp32", "WORK": "*i32", "PART": "*fp32", "TRACE": "*i64"}
_FLOAT_SCALARS = ("neg_scale_log2e", "scale")


def compile_sm90(
    kernel,
    constexprs: dict,
    dtype: str = "bf16",
    *,
    num_warps: int = 4,
    num_stages: int = 3,
    gluon_kernel: bool = False,
) -> dict[str, object]:
    """Compiles one of the kernels for Hopper (sm_90) with ptxas but no GPU, for static checks (tests/unit): returns
    the dynamic shared memory in bytes, the warps, the PTX, and the resource line `cuobjdump` prints for the cubin
    (registers, stack, local memory: a nonzero STACK or LOCAL means spilled registers). Arguments not in `constexprs`:
    the data pointers (Q, K, …) of `dtype`, SEQ int32, BIAS and DQA float32, `neg_scale_log2e` and `scale` float32,
    the rest int32. Pointers and strides are marked divisible by 16, as a launch specializes them at the bench's
    and trainer's shapes. Needs a process without TRITON_INTERPRET=1."""
    import inspect
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRET:
        raise RuntimeError("compile_sm90 needs a process without TRITON_INTERPRET=1")
    names = kernel.arg_names
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    constexprs = {**defaults, **{a: v for a, v in constexprs.items() if a in names}}

    def kind(a: str) -> str:
        if a in constexprs:
            return "constexpr"
        if a in _DATA_POINTERS or a in _POINTER_TYPES:
            return _POINTER_TYPES.get(a, f"*{dtype}")
        return "fp32" if a in _FLOAT_SCALARS else "i32"

    signature = {a: kind(a) for a in names}
    attrs = {
        (names.index(a),): [["tt.divisibility", 16]]
        for a, k in signature.items()
        if k.startswith("*") or (a.startswith("stride_") and k == "i32")
    }
    if gluon_kernel:
        from triton.experimental.gluon._runtime import GluonASTSource as source_type
    else:
        source_type = ASTSource
    src = source_type(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    resources = next(line.strip() for line in usage.splitlines() if "REG:" in line)
    return {"shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps, "ptx": compiled.asm["ptx"],
            "resources": resources}  # fmt: skip
