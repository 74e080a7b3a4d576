"""Masked gene modelling loss: predict the gene id and/or the expression value at masked positions.

Shape key: B cells, T tokens, M masked positions, V vocabulary, N value bins.

`model.objective`: gene → cross-entropy over the vocabulary; value → cross-entropy over bins (binned encoding)
or MSE on log1p(value) (continuous); both → their sum. Means are over the masked positions of this rank's batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scfm_data_service import schema
from scfm_platform.model import ModelOutput, masked_positions


def masked_loss(
    out: ModelOutput,
    batch: dict[str, torch.Tensor],
    value_encoding: str,
    n_bins: int,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (scalar) and its parts, from model outputs at `batch["mask"]` [B, T] positions. `positions` int64 [M]
    are those positions as `masked_positions` gives them, when the caller made them on the host (no device sync
    here then); by default they are taken from the batch's mask."""
    pos_M = masked_positions(batch[schema.MASK]) if positions is None else positions
    parts: dict[str, torch.Tensor] = {}
    n = max(pos_M.shape[0], 1)  # sums / n: a batch without masked positions gives 0, not NaN
    if out.gene_logits_MV is not None:
        target_M = batch[schema.TARGET_GENE_IDS].flatten().index_select(0, pos_M)
        parts["gene_loss"] = F.cross_entropy(out.gene_logits_MV.float(), target_M, reduction="sum") / n
    if out.value_pred is not None:
        target_M = batch[schema.TARGET_VALUES].flatten().index_select(0, pos_M).float()
        if value_encoding == "binned":
            parts["value_loss"] = (
                F.cross_entropy(out.value_pred.float(), target_M.long().clamp(0, n_bins - 1), reduction="sum") / n
            )
        else:
            parts["value_loss"] = (
                F.mse_loss(out.value_pred.float(), torch.log1p(target_M.clamp(min=0)), reduction="sum") / n
            )
    loss = sum(parts.values())
    return loss, parts  # type: ignore[return-value]
