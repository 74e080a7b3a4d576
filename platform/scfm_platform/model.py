"""The cell transformer: a bidirectional pre-LN encoder over one cell's tokens (CLS first, then genes).

Shape key: B cells, T padded tokens, D model dim, H query heads, K key/value heads, E head dim, F MLP hidden,
M masked positions in the batch, V vocabulary (special tokens + genes), N value bins.

Input embedding = gene embedding + expression-value embedding (+ a learned rank embedding for the rank tokenizer,
whose token order is the expression rank). Value encoding: `binned` looks the bin index up in a table (n_bins
rows); `continuous` maps log1p(value) through a small MLP; `auto` is binned for the binned tokenizer and none for
the rank tokenizer (its values are all 0: the order carries expression). Blocks: x += ls·Attn(LN(x));
x += ls·MLP(LN(x)), with optional per-head RMS QK-norm and LayerScale (`layer_scale` > 0 is the init value of a
learned per-channel gain). Attention goes through `attention.attention`. Heads run on masked positions only:
gene logits [M, V] (tied to the gene embedding) and a value prediction ([M, N] bin logits when binned, else [M]
regression of log1p(value)). Cell embedding: CLS, or mean of valid genes.

Presets (60,000 genes + 3 special tokens, tied gene head, rank tokenizer with max_len 2048; exact numbers from
`count_params`):
    tiny    dim 64,   depth 2,  heads 4,  mlp 4   4.1M    (CPU demo; almost all of it the gene embedding)
    small   dim 256,  depth 4,  heads 4,  mlp 4   19.1M
    base    dim 512,  depth 8,  heads 8,  mlp 4   57.1M
    160m    dim 768,  depth 16, heads 6,  mlp 4   161.1M  (113.4M in blocks, 46.1M gene embedding; 165.8M at 8K)
    1b      dim 2048, depth 18, heads 16, mlp 4   1.03B
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scfm_data_service.schema import PAD_ID
from scfm_platform.attention import attention
from scfm_platform.config import ModelConfig, RunConfig

PRESETS: dict[str, dict[str, float]] = {
    "tiny": {"dim": 64, "depth": 2, "heads": 4, "mlp_ratio": 4.0},
    "small": {"dim": 256, "depth": 4, "heads": 4, "mlp_ratio": 4.0},
    "base": {"dim": 512, "depth": 8, "heads": 8, "mlp_ratio": 4.0},
    "160m": {"dim": 768, "depth": 16, "heads": 6, "mlp_ratio": 4.0},  # head dim 128: the kernels' fastest
    "1b": {"dim": 2048, "depth": 18, "heads": 16, "mlp_ratio": 4.0},
}


@dataclass
class Dims:
    """Resolved model shape (preset filled in where the config says 0)."""

    dim: int
    depth: int
    heads: int
    kv_heads: int
    mlp_hidden: int
    vocab_size: int
    n_bins: int
    value_encoding: str  # binned | continuous | none (rank tokenizer: the order carries the expression)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def resolve_dims(m: ModelConfig, *, vocab_size: int, n_bins: int, tokenizer: str) -> Dims:
    """Fill preset values into the fields left at 0 and resolve `value_encoding=auto`."""
    p = PRESETS[m.preset]
    dim, depth, heads = m.dim or int(p["dim"]), m.depth or int(p["depth"]), m.heads or int(p["heads"])
    if dim % heads:
        raise ValueError(f"model dim {dim} is not divisible by heads {heads}")
    value_encoding = m.value_encoding if m.value_encoding != "auto" else ("binned" if tokenizer == "binned" else "none")
    mlp_hidden = round((m.mlp_ratio or p["mlp_ratio"]) * dim)
    return Dims(dim, depth, heads, m.kv_heads or heads, mlp_hidden, vocab_size, n_bins, value_encoding)


@dataclass
class ModelOutput:
    h_BTD: torch.Tensor  # final hidden states (after the last LayerNorm)
    gene_logits_MV: torch.Tensor | None  # logits over the vocabulary at masked positions (objective gene|both)
    value_pred: torch.Tensor | None  # [M, N] bin logits or [M] regression at masked positions (objective value|both)


class QKNorm(nn.RMSNorm):
    """Per-head RMSNorm over E that computes in the input's dtype (fp32 weights under bf16 autocast stay fused)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Block(nn.Module):
    """Pre-LN transformer block: attention and MLP, each on a residual branch with optional LayerScale."""

    def __init__(self, d: Dims, m: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = d.heads, d.kv_heads, d.head_dim
        self.kind, self.softmax_backend = m.attention, m.softmax_backend
        self.deterministic = m.deterministic_attention
        self.norm1 = nn.LayerNorm(d.dim)
        self.qkv = nn.Linear(d.dim, (d.heads + 2 * d.kv_heads) * d.head_dim)
        self.q_norm = QKNorm(d.head_dim) if m.qk_norm else nn.Identity()
        self.k_norm = QKNorm(d.head_dim) if m.qk_norm else nn.Identity()
        self.proj = nn.Linear(d.dim, d.dim)
        self.norm2 = nn.LayerNorm(d.dim)
        self.fc1 = nn.Linear(d.dim, d.mlp_hidden)
        self.fc2 = nn.Linear(d.mlp_hidden, d.dim)
        self.drop = nn.Dropout(m.dropout)
        ls = m.layer_scale
        self.ls1 = nn.Parameter(torch.full((d.dim,), ls)) if ls > 0 else None
        self.ls2 = nn.Parameter(torch.full((d.dim,), ls)) if ls > 0 else None

    def forward(self, x_BTD: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        qkv = self.qkv(self.norm1(x_BTD))
        q_BTHE, k_BTKE, v_BTKE = qkv.split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q_BTHE = self.q_norm(q_BTHE.view(B, T, self.heads, self.head_dim))
        k_BTKE = self.k_norm(k_BTKE.view(B, T, self.kv_heads, self.head_dim))
        v_BTKE = v_BTKE.view(B, T, self.kv_heads, self.head_dim)
        o_BTHE = attention(
            q_BTHE, k_BTKE, v_BTKE, seq_lens,
            kind=self.kind, softmax_backend=self.softmax_backend, deterministic=self.deterministic,
        )  # fmt: skip
        a_BTD = self.drop(self.proj(o_BTHE.reshape(B, T, -1)))
        x_BTD = x_BTD + (a_BTD * self.ls1 if self.ls1 is not None else a_BTD)
        f_BTD = self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x_BTD)))))
        return x_BTD + (f_BTD * self.ls2 if self.ls2 is not None else f_BTD)


class CellTransformer(nn.Module):
    """Bidirectional encoder with masked-gene heads; single device (DeepSpeed wraps it for training)."""

    def __init__(self, m: ModelConfig, *, vocab_size: int, max_len: int, n_bins: int, tokenizer: str):
        super().__init__()
        self.cfg = m
        self.dims = d = resolve_dims(m, vocab_size=vocab_size, n_bins=n_bins, tokenizer=tokenizer)
        self.gene_emb = nn.Embedding(vocab_size, d.dim, padding_idx=PAD_ID)
        self.value_emb: nn.Module | None = None
        if d.value_encoding == "binned":
            self.value_emb = nn.Embedding(n_bins, d.dim)
        elif d.value_encoding == "continuous":
            self.value_emb = nn.Sequential(nn.Linear(1, d.dim), nn.GELU(), nn.Linear(d.dim, d.dim))
        self.rank_emb = nn.Embedding(max_len, d.dim) if tokenizer == "rank" else None
        self.blocks = nn.ModuleList(Block(d, m) for _ in range(d.depth))
        self.norm = nn.LayerNorm(d.dim)
        self.gene_bias = nn.Parameter(torch.zeros(vocab_size)) if m.objective in ("gene", "both") else None
        n_value_out = n_bins if d.value_encoding == "binned" else 1
        self.value_head = nn.Linear(d.dim, n_value_out) if m.objective in ("value", "both") else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, zero biases; residual output projections scaled by 1/√(2·depth)."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=0.02)
        for blk in self.blocks:
            for lin in (blk.proj, blk.fc2):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * self.dims.depth))
        with torch.no_grad():
            self.gene_emb.weight[PAD_ID].zero_()

    def encode(self, gene_ids: torch.Tensor, values: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """gene_ids int [B,T], values float [B,T], seq_lens int32 [B] → hidden states [B,T,D] (padding rows 0)."""
        T = gene_ids.shape[1]
        x_BTD = self.gene_emb(gene_ids)
        if self.dims.value_encoding == "binned":
            x_BTD = x_BTD + self.value_emb(values.long().clamp(0, self.dims.n_bins - 1))
        elif self.value_emb is not None:
            x_BTD = x_BTD + self.value_emb(torch.log1p(values.float().clamp(min=0)).unsqueeze(-1).to(x_BTD.dtype))
        if self.rank_emb is not None:
            x_BTD = x_BTD + self.rank_emb(torch.arange(T, device=gene_ids.device))[None]
        valid_BT = torch.arange(T, device=gene_ids.device)[None, :] < seq_lens[:, None]
        x_BTD = x_BTD * valid_BT[..., None].to(x_BTD.dtype)
        # Sigmoid kernels take seq_lens as they are; softmax skips the mask when nothing is padded (one sync).
        lens = seq_lens if self.cfg.attention == "sigmoid" or bool((seq_lens < T).any()) else None
        for blk in self.blocks:
            x_BTD = blk(x_BTD, lens)
        return self.norm(x_BTD) * valid_BT[..., None].to(x_BTD.dtype)

    def forward(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        seq_lens: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Encode and, where `mask` is given, predict genes/values at the masked positions. `mask` is bool [B,T],
        or their flat indices int64 [M] from `masked_positions` (made on the host: a bool mask on the GPU costs a
        device sync to count M, and its gather's backward a sort)."""
        h_BTD = self.encode(gene_ids, values, seq_lens)
        if mask is None:
            return ModelOutput(h_BTD, None, None)
        pos_M = masked_positions(mask) if mask.dtype == torch.bool else mask
        h_MD = h_BTD.flatten(0, 1).index_select(0, pos_M)
        gene_logits = self.gene_logits(h_MD) if self.gene_bias is not None else None
        value_pred = None
        if self.value_head is not None:
            value_pred = self.value_head(h_MD)
            value_pred = value_pred if self.dims.value_encoding == "binned" else value_pred.squeeze(-1)
        return ModelOutput(h_BTD, gene_logits, value_pred)

    def gene_logits(self, h_MD: torch.Tensor) -> torch.Tensor:
        """[M, D] → logits [M, V] of the tied gene head. The product runs over the vocabulary padded with zero
        rows to a multiple of 64: with an odd V (60,003 for the presets) one of its products otherwise falls back to
        an unaligned kernel (6.5 ms of a 335 ms 160M/8K step on the H200, docs/benchmarks.md)."""
        w_VD, b_V = self.gene_emb.weight, self.gene_bias
        V = w_VD.shape[0]
        pad = (-V) % 64
        if not pad:
            return F.linear(h_MD, w_VD, b_V)
        return F.linear(h_MD, F.pad(w_VD, (0, 0, 0, pad)), F.pad(b_V, (0, pad)))[:, :V]

    def cell_embedding(self, gene_ids: torch.Tensor, values: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """One vector per cell [B, D]: the CLS state, or the mean over valid gene tokens (`model.pooling`)."""
        h_BTD = self.encode(gene_ids, values, seq_lens)
        if self.cfg.pooling == "cls":
            return h_BTD[:, 0]
        T = h_BTD.shape[1]
        pos_T = torch.arange(T, device=h_BTD.device)
        genes_BT = (pos_T[None, :] >= 1) & (pos_T[None, :] < seq_lens[:, None])
        w_BT = genes_BT.to(h_BTD.dtype)
        return (h_BTD * w_BT[..., None]).sum(1) / w_BT.sum(1, keepdim=True).clamp(min=1)


def masked_positions(mask_BT: torch.Tensor) -> torch.Tensor:
    """bool [B,T] → int64 [M]: the flat indices b·T + t of the masked positions, in row-major order (the order of
    `x[mask_BT]`)."""
    return mask_BT.flatten().nonzero().squeeze(1)


def build_model(cfg: RunConfig, vocab_size: int) -> CellTransformer:
    """The model a run config describes, for a vocabulary of `vocab_size` tokens (special tokens included)."""
    d = cfg.data
    return CellTransformer(cfg.model, vocab_size=vocab_size, max_len=d.max_len, n_bins=d.n_bins, tokenizer=d.tokenizer)


def count_params(model: nn.Module) -> int:
    """Trainable parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layer_groups(model: CellTransformer) -> dict[str, list[nn.Parameter]]:
    """Parameters grouped per layer for per-layer grad norms: `embed`, `block.0` … `block.{L-1}`, `head`."""
    groups: dict[str, list[nn.Parameter]] = {"embed": [], "head": []}
    for i in range(len(model.blocks)):
        groups[f"block.{i}"] = []
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            groups["block." + name.split(".")[1]].append(p)
        elif name.startswith(("gene_emb", "value_emb", "rank_emb")):
            groups["embed"].append(p)
        else:
            groups["head"].append(p)
    return groups
