"""iter_batches over a real SOMA atlas: exactly once, equal steps, per-epoch order, resume, budget, val, masks,
the Ray Data pipeline (local Ray) against the in-process engine, and the zarr token cache against the atlas."""

from __future__ import annotations

import importlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest_data import demo_atlas, local_ray, small_config  # noqa: F401

from scfm_data_service import (
    CLS_ID,
    MASK_ID,
    PAD_ID,
    DataError,
    StreamState,
    iter_batches,
    steps_per_epoch,
    vocab_size,
    write_token_cache,
)
from scfm_data_service.atlas import read_meta, read_obs
from scfm_data_service.datasource import record_reads
from scfm_data_service.shuffle import BLOCKS_PER_WINDOW, is_val
from scfm_data_service.stream import _units, epoch_plan


def _epoch(cfg, world, epoch, split="train", start_step=0):
    return [
        list(iter_batches(cfg, rank=r, world_size=world, epoch=epoch, split=split, start_step=start_step))
        for r in range(world)
    ]


def _ids(batches):
    return np.concatenate([b["soma_joinid"].numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_exactly_once_equal_steps_budget_and_new_order_each_epoch(demo_atlas):  # noqa: F811
    cfg = small_config(demo_atlas)
    obs = read_obs(demo_atlas, ["nnz"])
    train = obs.index.to_numpy()[~is_val(obs.index.to_numpy(), cfg.val_fraction)]
    orders = []
    for world in (1, 3):
        steps = steps_per_epoch(cfg, world)
        for epoch in (0, 1):
            per_rank = _epoch(cfg, world, epoch)
            assert [len(r) for r in per_rank] == [steps] * world
            got = np.concatenate([_ids(r) for r in per_rank])
            assert len(got) == len(train) and np.array_equal(np.sort(got), train)
            padded = real = 0
            for b in (b for r in per_rank for b in r):
                bsz, t = b["gene_ids"].shape
                assert bsz * t <= cfg.tokens_per_batch and t == int(b["seq_lens"].max()) <= cfg.max_len
                assert b["seq_lens"].dtype == torch.int32 and b["soma_joinid"].dtype == torch.int64
                padded += bsz * t
                real += int(b["seq_lens"].sum())
            assert 1 - real / padded < 0.05
            if world == 1:
                orders.append(got)
    assert not np.array_equal(orders[0], orders[1])


def test_batches_follow_the_contract(demo_atlas):  # noqa: F811
    cfg = small_config(demo_atlas, mask_ratio=0.2)
    v = vocab_size(cfg)
    assert v == 3 + read_meta(demo_atlas)["n_genes"]
    obs = read_obs(demo_atlas, ["nnz"])
    for b in list(iter_batches(cfg, rank=0, world_size=1, epoch=0))[:20]:
        lens = b["seq_lens"].long()
        pos = torch.arange(b["gene_ids"].shape[1])[None]
        valid = pos < lens[:, None]
        tgt = b["target_gene_ids"]
        assert torch.all(tgt[:, 0] == CLS_ID) and torch.all(tgt[~valid] == PAD_ID)
        assert torch.all((tgt[valid] == CLS_ID) | ((tgt[valid] >= 3) & (tgt[valid] < v)))
        want_lens = np.minimum(obs.loc[b["soma_joinid"].numpy(), "nnz"].to_numpy() + 1, cfg.max_len)
        assert np.array_equal(lens.numpy(), want_lens)
        m = b["mask"]
        assert not m[:, 0].any() and not m[~valid].any()
        n_masked = m.sum(1)
        want = np.maximum(1, np.rint(cfg.mask_ratio * (lens.numpy() - 1)))
        assert np.array_equal(n_masked.numpy(), np.where(lens.numpy() > 1, want, 0))
        assert torch.all(b["gene_ids"][m] == MASK_ID) and torch.equal(b["gene_ids"][~m], tgt[~m])
        assert torch.all(b["values"][m] == 0)
        # rank tokenizer: distinct genes per cell
        row = tgt[0, 1 : lens[0]]
        assert len(torch.unique(row)) == len(row)


def test_resume_continues_exactly_where_it_stopped(demo_atlas):  # noqa: F811
    cfg = small_config(demo_atlas, tokenizer="binned")
    full = list(iter_batches(cfg, rank=1, world_size=2, epoch=3))
    state = StreamState.from_dict(StreamState(epoch=3, step=7).to_dict())
    resumed = list(iter_batches(cfg, rank=1, world_size=2, epoch=state.epoch, start_step=state.step))
    assert len(resumed) == len(full) - 7
    for a, b in zip(full[7:], resumed, strict=True):
        _same(a, b)
    assert list(iter_batches(cfg, rank=1, world_size=2, epoch=3, start_step=len(full))) == []
    with pytest.raises(DataError, match="start_step"):
        next(iter_batches(cfg, rank=0, world_size=2, epoch=3, start_step=len(full) + 1))


def test_val_is_held_out_deterministic_and_all_covers_everything(demo_atlas):  # noqa: F811
    cfg = small_config(demo_atlas)
    val = _ids(_epoch(cfg, 1, 0, split="val")[0])
    train = _ids(_epoch(cfg, 1, 0)[0])
    assert len(val) > 0 and not set(val) & set(train)
    a, b = _epoch(cfg, 2, 0, split="val"), _epoch(cfg, 2, 5, split="val")
    for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True):
        _same(x, y)  # no shuffle, masks independent of epoch
    everything = _ids(_epoch(cfg, 1, 0, split="all")[0])
    assert np.array_equal(np.sort(everything), np.sort(np.concatenate([val, train])))
    assert len(everything) == read_meta(demo_atlas)["n_cells"]


@pytest.mark.parametrize("tokenize_on", ["read", "actors"])
def test_ray_data_pipeline_gives_the_same_batches_as_in_process(demo_atlas, local_ray, tokenize_on):  # noqa: F811
    cfg = small_config(demo_atlas, tokenizer="binned", n_bins=11)
    ray_cfg = replace(cfg, engine="ray", tokenize_on=tokenize_on)
    world = 2
    for rank in range(world):
        want = list(iter_batches(cfg, rank=rank, world_size=world, epoch=1, start_step=2))
        got = list(iter_batches(ray_cfg, rank=rank, world_size=world, epoch=1, start_step=2))
        assert len(got) == len(want) == steps_per_epoch(cfg, world) - 2
        for a, b in zip(want, got, strict=True):
            _same(a, b)


@pytest.mark.parametrize("tokenizer", ["rank", "binned"])
def test_zarr_token_cache_gives_the_same_batches(demo_atlas, tmp_path, tokenizer, monkeypatch):  # noqa: F811
    tokenize_module = importlib.import_module("scfm_data_service.tokenize")  # the package exports a tokenize()

    monkeypatch.setattr(tokenize_module, "CHUNK_TOKENS", 997)  # gathers and masks run in many pieces
    cfg = small_config(demo_atlas, tokenizer=tokenizer)
    attrs = write_token_cache(cfg, tmp_path / "tokens.zarr")
    assert attrs["n_cells"] == read_meta(demo_atlas)["n_cells"]
    cached = replace(cfg, tokens=str(tmp_path / "tokens.zarr"))
    assert vocab_size(cached) == vocab_size(cfg) and steps_per_epoch(cached, 2) == steps_per_epoch(cfg, 2)
    for a, b in zip(_epoch(cfg, 2, 1)[1], _epoch(cached, 2, 1)[1], strict=True):
        _same(a, b)
    with pytest.raises(DataError, match="max_len"):
        steps_per_epoch(replace(cached, max_len=128), 1)


def test_config_errors_name_the_key(demo_atlas):  # noqa: F811
    with pytest.raises(DataError, match=r"data\.tokenizer='bpe'.*allowed: rank, binned"):
        steps_per_epoch(small_config(demo_atlas, tokenizer="bpe"), 1)
    with pytest.raises(DataError, match=r"data\.tokenize_on='gpu'.*allowed: read, actors"):
        steps_per_epoch(small_config(demo_atlas, tokenize_on="gpu"), 1)
    with pytest.raises(DataError, match="tokens_per_batch"):
        steps_per_epoch(small_config(demo_atlas, tokens_per_batch=100), 1)
    with pytest.raises(DataError, match=r"not an atlas|no scfm metadata"):
        steps_per_epoch(small_config("/nonexistent/atlas"), 1)


def test_a_read_unit_is_a_few_contiguous_runs_of_the_atlas(demo_atlas):  # noqa: F811
    cfg = small_config(demo_atlas, bucket_window_batches=1 << 20)
    plan = epoch_plan(cfg, epoch=1, world_size=1)
    train = np.sort(plan.cells)
    units = _units(plan, 0, 0, cfg.bucket_window_batches)
    assert sum(len(u.cells) for u in units) == len(train) and len(units) == int(plan.window.max()) + 1
    for u in units:
        pos = np.searchsorted(train, np.unique(u.cells))  # positions among the train cells
        assert np.count_nonzero(np.diff(pos) > 1) + 1 <= BLOCKS_PER_WINDOW


def test_only_these_cells_are_planned_and_read(demo_atlas):  # noqa: F811
    """iter_batches(only=joinids): exactly those cells, once each, and the readers touch about only them (the
    evaluation path of one dataset); an id outside the atlas is one error naming how many."""
    cfg = small_config(demo_atlas)
    everything = _ids(_epoch(cfg, 1, 0, split="all")[0])
    pick = np.sort(everything)[300:800]  # consecutive soma_joinids, as one ingested dataset is
    with record_reads() as full:
        list(iter_batches(cfg, rank=0, world_size=1, epoch=0, split="all"))
    with record_reads() as log:
        got = _ids(list(iter_batches(cfg, rank=0, world_size=1, epoch=0, split="all", only=pick)))
    assert np.array_equal(np.sort(got), pick)
    assert all(pick[0] <= first and first + rows <= pick[-1] + 1 for _, first, rows in log)  # nothing outside
    assert sum(rows for _, _, rows in log) < 0.5 * sum(rows for _, _, rows in full)
    with pytest.raises(DataError, match="1 of the requested cells are not in"):
        list(iter_batches(cfg, rank=0, world_size=1, epoch=0, split="all", only=np.array([10**9])))


@pytest.mark.parametrize("path", ["atlas", "tokens"])
def test_each_rank_reads_only_its_share(demo_atlas, tmp_path, path):  # noqa: F811
    """The reads each rank's reader issues (real readers, recorded): with 4 ranks each reads ~1/4 of what one rank
    reads for the whole epoch, in as few range reads per window, and the 4 together read about the same total."""
    cfg = small_config(demo_atlas, bucket_window_batches=1 << 20)
    if path == "tokens":
        write_token_cache(cfg, tmp_path / "tokens.zarr")
        cfg = replace(cfg, tokens=str(tmp_path / "tokens.zarr"))

    def reads(world, rank):
        with record_reads() as log:
            n = len(_ids(list(iter_batches(cfg, rank=rank, world_size=world, epoch=1))))
        return n, sum(rows for _, _, rows in log), len(log), {kind for kind, _, _ in log}

    n1, rows1, calls1, kinds1 = reads(1, 0)
    per_rank = [reads(4, r) for r in range(4)]
    assert kinds1 == {"range"} and all(k == {"range"} for *_, k in per_rank)
    assert sum(n for n, *_ in per_rank) == n1
    assert rows1 < 1.1 * n1  # one rank reads about its cells (val cells between them are read through)
    for n, rows, calls, _ in per_rank:
        assert rows < 1.1 * n and rows < 0.3 * rows1  # ~1/4 each (was: every rank read every window's runs)
        assert calls <= 0.3 * calls1 + BLOCKS_PER_WINDOW
    assert sum(rows for _, rows, _, _ in per_rank) < 1.1 * rows1
