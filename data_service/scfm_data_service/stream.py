"""`iter_batches`: the batches one training rank gets, per the contract in schema.py.

Pipeline (engine="ray", the training path): the epoch plan (shuffle.py) gives this rank's steps; its steps of one
shuffle window form a read unit (a few contiguous runs of soma_joinids, so a few range reads); a Ray Data
Datasource has one read task per unit that reads it (atlas X rows, or the zarr token cache), tokenizes (atlas
path), draws the masks and pads every step into its [B, T] arrays, so the consumer only turns each step's arrays
into tensors. (Tokenizing in the read task, not on a separate actor pool, saves a hop through the object store:
1.1-2x the cells/s on a 2-core machine, docs/benchmarks.md.) `data.tokenize_on=actors` moves tokenizing, masking
and padding to `map_batches` on an actor pool of `read_workers` actors instead (same batches), for nodes where the
read tasks should stay light. Inside a Ray Train worker the running Ray is used; standalone, a local Ray is started.
engine="local" runs the same read and tokenize code in-process (notebooks, quick checks).

Masking is a pure function of (seed, epoch, soma_joinid, position): the same cell gets the same mask in an epoch
whatever batch, rank or engine delivers it; val uses a fixed epoch so its masks never change.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from scfm_data_service import schema as S
from scfm_data_service.config import DataConfig
from scfm_data_service.datasource import PADDED, AtlasReader, Tokenizer, Unit, ZarrReader, _csr, plan_datasource
from scfm_data_service.errors import DataError
from scfm_data_service.shuffle import EpochPlan, is_val, make_plan
from scfm_data_service.tokenize import TOKENIZERS, token_lengths

SPLITS = ("train", "val", "all")  # all: every cell once (train + val), unshuffled, e.g. for embeddings
ENGINES = ("ray", "local")
TOKENIZE_ON = ("read", "actors")
VAL_EPOCH = 0xFFFFFFFF


@dataclass
class StreamState:
    """Where a rank's stream stands: resume with iter_batches(..., epoch=epoch, start_step=step)."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        return cls(epoch=int(d["epoch"]), step=int(d["step"]))


@dataclass(frozen=True)
class Cells:
    """What the plan needs to know about the atlas (or token cache): every cell and its token length."""

    joinids: np.ndarray  # int64 [N] sorted
    lengths: np.ndarray  # int64 [N] tokens incl. CLS, truncated to max_len
    n_genes: int
    gene_median: np.ndarray | None  # float32 [n_genes]; None when reading the token cache


def _check(cfg: DataConfig) -> None:
    if cfg.tokenizer not in TOKENIZERS:
        raise DataError(f"data.tokenizer={cfg.tokenizer!r} is not a tokenizer; allowed: {', '.join(TOKENIZERS)}")
    if cfg.engine not in ENGINES:
        raise DataError(f"data.engine={cfg.engine!r} is not an engine; allowed: {', '.join(ENGINES)}")
    if cfg.tokenize_on not in TOKENIZE_ON:
        raise DataError(f"data.tokenize_on={cfg.tokenize_on!r} is not a stage; allowed: {', '.join(TOKENIZE_ON)}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction={cfg.val_fraction} must be in [0, 1)")
    if not 0.0 <= cfg.mask_ratio <= 1.0:
        raise DataError(f"data.mask_ratio={cfg.mask_ratio} must be in [0, 1]")


@functools.lru_cache(maxsize=8)
def _atlas_cells(uri: str, n_cells: int, max_len: int) -> Cells:
    from scfm_data_service.atlas import cell_nnz, read_meta

    meta = read_meta(uri)
    joinids, nnz = cell_nnz(uri)
    return Cells(joinids, token_lengths(nnz, max_len), meta["n_genes"], meta["gene_median"])


def _cells(cfg: DataConfig) -> Cells:
    _check(cfg)
    if cfg.tokens:
        from scfm_data_service.cache import cache_cells

        return cache_cells(cfg)
    from scfm_data_service.atlas import read_meta

    return _atlas_cells(cfg.atlas, read_meta(cfg.atlas)["n_cells"], cfg.max_len)


_PLANS: dict[tuple, EpochPlan] = {}


def as_config(cfg) -> DataConfig:
    """A DataConfig from a DataConfig or an OmegaConf node of one (the `data` section of a run config)."""
    if isinstance(cfg, DataConfig):
        return cfg
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
    return obj if isinstance(obj, DataConfig) else DataConfig(**obj)


def epoch_plan(
    cfg: DataConfig, *, epoch: int, world_size: int, split: str = "train", only: np.ndarray | None = None
) -> EpochPlan:
    """The plan all ranks share for this epoch (deterministic in cfg, epoch, world_size); `only`: soma_joinids
    [K] to restrict the split to (cells outside it are never read)."""
    if split not in SPLITS:
        raise DataError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
    cfg = as_config(cfg)
    cells = _cells(cfg)
    subset = None if only is None else np.unique(np.asarray(only, dtype=np.int64))
    key = (id(cells), tuple(sorted(asdict(cfg).items())), split, epoch if split == "train" else 0, world_size)
    key += (None if subset is None else hash(subset.tobytes()),)
    if key not in _PLANS:
        held = is_val(cells.joinids, cfg.val_fraction)
        keep = {"val": held, "train": ~held, "all": np.ones_like(held)}[split]
        if subset is not None:
            unknown = np.setdiff1d(subset, cells.joinids)
            if len(unknown):
                raise DataError(f"{len(unknown)} of the requested cells are not in {cfg.atlas} (e.g. {unknown[0]})")
            keep = keep & np.isin(cells.joinids, subset)
        if len(_PLANS) > 16:
            _PLANS.clear()
        _PLANS[key] = make_plan(
            cells.joinids[keep],
            cells.lengths[keep],
            max_len=cfg.max_len,
            tokens_per_batch=cfg.tokens_per_batch,
            max_cells=cfg.max_cells_per_batch,
            bucket_ratio=cfg.bucket_ratio,
            block=cfg.shuffle_block_cells,
            seed=cfg.seed,
            epoch=epoch if split == "train" else 0,
            world_size=world_size,
            shuffle=split == "train",
        )
    return _PLANS[key]


def steps_per_epoch(cfg: DataConfig, world_size: int) -> int:
    """Train steps every rank runs per epoch (the same for every epoch: windows are the same cell sets)."""
    return epoch_plan(cfg, epoch=0, world_size=world_size).steps


def vocab_size(cfg: DataConfig) -> int:
    """Token ids the model embeds: N_SPECIAL + genes of the atlas vocabulary."""
    cfg = as_config(cfg)
    return S.N_SPECIAL + _cells(cfg).n_genes


# ---------------------------------------------------------------- handing batches over


def step_batches(tbl: pa.Table) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(step, batch dict of schema.py) for every row of a padded step table (Tokenizer output).

    The arrays arrive padded and masked; here they are only viewed, copied out of the (read-only, shared) Arrow
    buffers and the ids widened to int64."""
    steps = tbl["step"].to_numpy()
    t = tbl["t"].to_numpy()
    j_off, joinids = _csr(tbl["soma_joinid"])
    _, lens = _csr(tbl["seq_lens"])
    flat = {k: _csr(tbl[k]) for k in PADDED if k in tbl.column_names}
    for i, step in enumerate(steps.tolist()):
        a, b = int(j_off[i]), int(j_off[i + 1])
        shape = (b - a, int(t[i]))
        arr = {k: v[int(off[i]) : int(off[i + 1])].reshape(shape) for k, (off, v) in flat.items()}
        values = [
            torch.from_numpy(arr[k].copy()) if k in arr else torch.zeros(shape) for k in ("values", "target_values")
        ]
        yield (
            step,
            {
                S.GENE_IDS: torch.from_numpy(arr["gene_ids"].astype(np.int64)),
                S.VALUES: values[0],
                S.SEQ_LENS: torch.from_numpy(lens[a:b].astype(np.int32)),
                S.SOMA_JOINID: torch.from_numpy(joinids[a:b].astype(np.int64)),
                S.MASK: torch.from_numpy(arr["mask"].view(np.bool_).copy()),
                S.TARGET_GENE_IDS: torch.from_numpy(arr["target_gene_ids"].astype(np.int64)),
                S.TARGET_VALUES: values[1],
            },
        )


# ---------------------------------------------------------------- the stream


def _units(plan: EpochPlan, rank: int, start_step: int, max_steps: int) -> list[Unit]:
    """Read units of this rank: its steps of one plan window (a few contiguous atlas blocks), at most max_steps."""
    units = []
    steps = np.arange(start_step, plan.steps)
    win = plan.window[steps * plan.world_size + rank] if plan.window is not None else steps // max_steps
    brk = np.flatnonzero(np.diff(win)) + 1
    for run in np.split(steps, brk) if len(steps) else []:
        for a in range(0, len(run), max_steps):
            part = run[a : a + max_steps]
            cells = [plan.batch(rank, int(s)) for s in part]
            units.append(Unit(np.concatenate(cells), np.repeat(part, [len(c) for c in cells])))
    return units


def _ray_tables(cfg: DataConfig, units: list[Unit], reader, tokenizer: Tokenizer) -> Iterator[pa.Table]:
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    in_read = cfg.tokenize_on == "read"  # each read task also tokenizes, masks and pads its unit
    # One operator only: Ray Data's per-operator resource reservation (meant to keep several operators from
    # starving each other) then just caps the read tasks in flight; measured on a 2-CPU node it kept one of the
    # read_workers tasks running most of the time (7.1 of 8.3 s), with it off both ran (docs/benchmarks.md).
    ctx.op_resource_reservation_enabled = not in_read
    ds = ray.data.read_datasource(
        plan_datasource(units, reader, tokenizer if in_read else None),
        override_num_blocks=len(units),
        concurrency=max(1, cfg.read_workers),
        num_cpus=cfg.task_cpus,
    )
    if not in_read:  # tokenize (atlas path), mask and pad on an actor pool
        ds = ds.map_batches(
            Tokenizer,
            fn_constructor_args=(
                tokenizer.kind,
                tokenizer.max_len,
                tokenizer.n_bins,
                tokenizer.gene_median,
                (tokenizer.mask_ratio, tokenizer.seed, tokenizer.epoch),
            ),
            batch_size=None,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.read_workers)),
            num_cpus=cfg.task_cpus,
        )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)


def iter_batches(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    epoch: int,
    start_step: int = 0,
    split: str = "train",
    only: np.ndarray | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield this rank's batches of the epoch from `start_step` on (schema.py); train: steps_per_epoch of them.
    `only`: soma_joinids [K]: just these cells of the split (e.g. one dataset for evaluation); no other is read."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
    cfg = as_config(cfg)
    plan = epoch_plan(cfg, epoch=epoch, world_size=world_size, split=split, only=only)
    if not 0 <= start_step <= plan.steps:
        raise DataError(f"start_step={start_step} must be in [0, {plan.steps}] (steps per epoch)")
    cells = _cells(cfg)
    units = _units(plan, rank, start_step, max(1, cfg.bucket_window_batches))
    if not units:
        return
    reader = ZarrReader(cfg.tokens) if cfg.tokens else AtlasReader(cfg.atlas, cfg.measurement, cfg.layer)
    mask_epoch = epoch if split == "train" else VAL_EPOCH
    tokenizer = Tokenizer(
        cfg.tokenizer, cfg.max_len, cfg.n_bins, cells.gene_median, (cfg.mask_ratio, cfg.seed, mask_epoch)
    )
    if cfg.engine == "ray":
        tables = _ray_tables(cfg, units, reader, tokenizer)
    else:
        tables = (tokenizer(reader.read(u)) for u in units)
    step = start_step
    for tbl in tables:
        for got, batch in step_batches(tbl):
            if got != step:
                raise RuntimeError(f"stream delivered step {got}, expected {step} (rank {rank})")
            yield batch
            step += 1
    if step != plan.steps:
        raise RuntimeError(f"stream ended at step {step} of {plan.steps} (rank {rank})")


def iter_train_batches(
    cfg: DataConfig, *, epoch: int, start_step: int = 0, split: str = "train"
) -> Iterator[dict[str, torch.Tensor]]:
    """iter_batches for the calling Ray Train worker (rank and world size from the Ray Train context)."""
    import ray.train

    ctx = ray.train.get_context()
    return iter_batches(
        cfg,
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        epoch=epoch,
        start_step=start_step,
        split=split,
    )
