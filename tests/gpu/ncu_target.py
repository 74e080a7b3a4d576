"""One launch of each attention kernel at B = 2, T = 8192, H = 16, D = 128, bf16, dense, for a profiler run:

    ncu --clock-control none --section WarpStateStats --section ComputeWorkloadAnalysis \\
        --kernel-name regex:'_fwd_kernel|_dkdv_kernel|_dq_kernel' python3 tests/gpu/ncu_target.py

Fixed launches (no autotuning): the forward's two leading tiles with the bf16 sigmoid, and the backward's
default pair; then cuDNN's softmax forward and backward on the same shape (add `|cudnn` to the regex)."""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from scfm_kernels._bwd import attention_backward
from scfm_kernels._fwd import attention_forward

B, T, H, D = 2, 8192, 16, 128
torch.manual_seed(0)
q, k, v, go = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
lens = torch.full((B,), T, device="cuda", dtype=torch.int32)
bias = torch.full((B,), -math.log(T), device="cuda")
for cfg in (
    dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, num_stages=3, SIG=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, SIG=3),
):
    attention_forward(q, k, v, lens, bias, D**-0.5, False, T, config=cfg)
attention_backward(
    go, q, k, v, lens, bias, D**-0.5, False, T,
    dkdv_config=dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
    dq_config=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
)  # fmt: skip
qt, kt, vt = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
    torch.autograd.grad(out, (qt, kt, vt), go.transpose(1, 2).contiguous())
torch.cuda.synchronize()
