"""Where training batches come from: the data service, or a synthetic stream for `data.atlas=synthetic:<cells>`
(`synthetic:<cells>:full`: every cell `data.max_len` tokens, for throughput runs without padding).

Batches follow `scfm_data_service.schema`. The synthetic stream (no atlas, deterministic in seed/epoch/step/rank,
200 genes, binned values) exists for smoke runs and tests of the training machinery only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from scfm_data_service import schema
from scfm_data_service.config import DataConfig
from scfm_platform.synthetic import synthetic_batch

SYNTHETIC = "synthetic:"
SYNTHETIC_GENES = 200


def _synthetic(d: DataConfig) -> tuple[int, bool] | None:
    """(cells, full) of `synthetic:<cells>[:full]` (1000 cells when left out; full: every cell `max_len` tokens, no
    padding, else lengths in [max_len/2, max_len]); None for an atlas."""
    if isinstance(d.atlas, str) and d.atlas.startswith(SYNTHETIC):
        cells, _, rest = d.atlas[len(SYNTHETIC) :].partition(":")
        if (cells and not cells.isdigit()) or rest not in ("", "full"):
            raise ValueError(
                f"data.atlas={d.atlas!r}: expected synthetic:<cells> or synthetic:<cells>:full "
                "(every cell data.max_len tokens long), e.g. synthetic:2000:full"
            )
        return int(cells or 1000), rest == "full"
    return None


def _synthetic_cells(d: DataConfig) -> int | None:
    spec = _synthetic(d)
    return None if spec is None else spec[0]


def _cells_per_batch(d: DataConfig) -> int:
    return max(1, min(d.max_cells_per_batch, d.tokens_per_batch // d.max_len))


def vocab_size(d: DataConfig) -> int:
    """Token vocabulary size (special tokens + genes)."""
    if _synthetic_cells(d) is not None:
        return SYNTHETIC_GENES + schema.N_SPECIAL
    import scfm_data_service

    return int(scfm_data_service.vocab_size(d))


def steps_per_epoch(d: DataConfig, world_size: int) -> int:
    """Batches each rank gets per epoch of the training split (the same on every rank)."""
    n = _synthetic_cells(d)
    if n is not None:
        return max(1, int(n * (1 - d.val_fraction)) // (_cells_per_batch(d) * world_size))
    import scfm_data_service

    return int(scfm_data_service.steps_per_epoch(d, world_size))


def batches(
    d: DataConfig,
    *,
    rank: int,
    world_size: int,
    epoch: int,
    start_step: int = 0,
    split: str = "train",
    only: Any = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's batches of one epoch, from batch `start_step` on; `only`: soma_joinids to restrict to (atlas)."""
    spec = _synthetic(d)
    if spec is None:
        import scfm_data_service

        yield from scfm_data_service.iter_batches(
            d, rank=rank, world_size=world_size, epoch=epoch, start_step=start_step, split=split, only=only
        )
        return
    if only is not None:
        raise ValueError("the synthetic stream has no soma_joinids to pick from (only= needs an atlas)")
    steps = steps_per_epoch(d, world_size) if split == "train" else 1 << 30
    for step in range(start_step, steps):
        key = (d.seed * 1_000_003 + epoch) * 1_000_003 + step * 64 + rank * 2 + (split == "val")
        gen = torch.Generator().manual_seed(key)
        yield synthetic_batch(
            _cells_per_batch(d), d.max_len, SYNTHETIC_GENES, mask_ratio=d.mask_ratio, n_bins=d.n_bins,
            full=spec[1], generator=gen,
        )  # fmt: skip
