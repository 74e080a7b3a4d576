"""Model FLOPs and MFU for the cell transformer.

Training FLOPs of one batch (forward + backward = 3 × forward; a multiply-add counts 2):

    flops = Σ_cells 6·P_tok·n_b  +  Σ_cells 12·L·D·n_b²  +  6·D·V·M  (+ 6·D·N·M for a binned value head)

where n_b is cell b's valid tokens (CLS included; padding is not counted), P_tok = L·(D·(H + 2K)·E + D² + 2·D·F) the
matmul parameters a token passes through in the blocks (QKV, output projection, MLP), L depth, D dim, H/K query/
key-value heads of size E, F MLP hidden, V vocabulary, M masked positions, N value bins. The 12·L·D·n² term is
attention over valid keys: QKᵀ and PV, 2·n²·D each forward. Embedding lookups, norms and elementwise work are not
counted. MFU = flops / (step seconds · peak FLOP/s of all devices).
"""

from __future__ import annotations

import torch

from scfm_platform.model import Dims

# Dense bf16 peak (FLOP/s) per device by name fragment; CPUs use `train.peak_tflops` or a nominal 1 TFLOP/s.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
)
CPU_NOMINAL = 1e12


def tokens_flops(d: Dims) -> int:
    """P_tok: block matmul parameters per token."""
    e = d.head_dim
    return d.depth * (d.dim * (d.heads + 2 * d.kv_heads) * e + d.dim * d.dim + 2 * d.dim * d.mlp_hidden)


def batch_flops(
    d: Dims, seq_lens: torch.Tensor, n_masked: int, *, gene_head: bool = True, binned_value: bool = False
) -> float:
    """Training FLOPs of one batch with valid lengths `seq_lens` [B] and `n_masked` predicted positions."""
    n = seq_lens.detach().to("cpu", torch.float64)
    flops = 6.0 * tokens_flops(d) * float(n.sum()) + 12.0 * d.depth * d.dim * float((n * n).sum())
    if gene_head:
        flops += 6.0 * d.dim * d.vocab_size * n_masked
    if binned_value:
        flops += 6.0 * d.dim * d.n_bins * n_masked
    return flops


def peak_flops(device: torch.device, override_tflops: float = 0.0) -> float:
    """Peak FLOP/s of one device: the override if set, else by GPU name, else a nominal CPU figure."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, peak in PEAK_BF16:
            if frag in name:
                return peak
    return CPU_NOMINAL
