"""Synthetic batches in the data-service batch contract (see scfm_data_service.schema), for tests and benchmarks.

Shape key: B cells, T tokens (CLS included). Genes are drawn so that each cell's genes cluster around a cell
"type" with a skewed frequency, which gives the masked-gene objective something learnable within a few steps.
"""

from __future__ import annotations

import torch

from scfm_data_service import schema


def synthetic_batch(
    n_cells: int,
    max_len: int,
    n_genes: int,
    *,
    mask_ratio: float = 0.15,
    n_bins: int = 51,
    full: bool = False,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """A batch of `n_cells` cells with up to `max_len` tokens (all `max_len` when `full`), genes in [0, n_genes)."""
    g = generator
    B, T = n_cells, max_len
    lens_B = torch.full((B,), T) if full else torch.randint(max(2, T // 2), T + 1, (B,), generator=g)
    types_B = torch.randint(0, 8, (B,), generator=g)
    span = max(T, n_genes // 8)
    offs_BT = (span * torch.rand(B, T, generator=g) ** 3).long()  # skewed: a few genes are common
    genes_BT = (types_B[:, None] * (n_genes // 8) + offs_BT) % n_genes
    tokens_BT = genes_BT + schema.N_SPECIAL
    tokens_BT[:, 0] = schema.CLS_ID
    values_BT = torch.randint(1, n_bins, (B, T), generator=g).float()
    values_BT[:, 0] = 0
    pos_BT = torch.arange(T)[None, :]
    valid_BT = pos_BT < lens_B[:, None]
    tokens_BT[~valid_BT] = schema.PAD_ID
    values_BT[~valid_BT] = 0
    mask_BT = (torch.rand(B, T, generator=g) < mask_ratio) & valid_BT & (pos_BT > 0)
    inputs_BT = tokens_BT.masked_fill(mask_BT, schema.MASK_ID)
    batch = {
        schema.GENE_IDS: inputs_BT,
        schema.VALUES: values_BT.masked_fill(mask_BT, 0.0),
        schema.SEQ_LENS: lens_B.to(torch.int32),
        schema.SOMA_JOINID: torch.arange(B, dtype=torch.int64),
        schema.MASK: mask_BT,
        schema.TARGET_GENE_IDS: tokens_BT,
        schema.TARGET_VALUES: values_BT,
    }
    return {k: v.to(device) for k, v in batch.items()}
