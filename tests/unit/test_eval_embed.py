"""embed_cells with the real cell transformer (tiny, CPU) on data-service-contract batches; zarr/h5ad writers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfm_data_service import schema
from scfm_platform.config import ModelConfig
from scfm_platform.eval.embed import embed_cells, read_zarr, unmasked_inputs, write_h5ad, write_zarr
from scfm_platform.model import CellTransformer
from scfm_platform.synthetic import synthetic_batch

N_GENES, MAX_LEN = 200, 24


def _model(pooling: str) -> CellTransformer:
    torch.manual_seed(0)
    m = ModelConfig(preset="tiny", pooling=pooling)
    return CellTransformer(m, vocab_size=N_GENES + schema.N_SPECIAL, max_len=MAX_LEN, n_bins=51, tokenizer="binned")


def _batches(n_batches: int = 3, cells: int = 8, mask_ratio: float = 0.3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n_batches):
        b = synthetic_batch(cells, MAX_LEN, N_GENES, mask_ratio=mask_ratio, generator=g)
        b[schema.SOMA_JOINID] = torch.arange(cells, dtype=torch.int64) * n_batches + (n_batches - 1 - i)
        out.append(b)
    return out


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_embed_cells_shapes_order_and_unmasking(pooling: str) -> None:
    model = _model(pooling).train()
    batches = _batches()
    joinids, X = embed_cells(model, batches)
    assert joinids.dtype == np.int64 and X.dtype == np.float32
    assert X.shape == (24, model.dims.dim) and np.isfinite(X).all()
    assert (joinids == np.arange(24)).all()  # every cell once, sorted by soma_joinid
    assert model.training  # mode restored
    assert any(bool(b[schema.MASK].any()) for b in batches)
    # the same cells without masking give the same embeddings: masking is undone
    clean = [{**b, schema.GENE_IDS: b[schema.TARGET_GENE_IDS], schema.VALUES: b[schema.TARGET_VALUES]} for b in batches]
    for b in clean:
        del b[schema.MASK]
    _, X_clean = embed_cells(model, clean)
    np.testing.assert_allclose(X, X_clean, rtol=1e-5, atol=1e-5)
    # and differ from embedding the masked inputs as they are
    masked = [{k: v for k, v in b.items() if k != schema.MASK} for b in batches]
    _, X_masked = embed_cells(model, masked)
    assert not np.allclose(X, X_masked, atol=1e-4)


def test_unmasked_inputs_restores_targets_only_at_mask() -> None:
    b = _batches(1)[0]
    gene_ids, values, seq_lens = unmasked_inputs(b)
    assert torch.equal(gene_ids, b[schema.TARGET_GENE_IDS])
    assert torch.equal(values, b[schema.TARGET_VALUES])
    assert torch.equal(seq_lens, b[schema.SEQ_LENS])


def test_embed_cells_rejects_duplicates_and_empty_input() -> None:
    model = _model("cls")
    b = _batches(1)[0]
    with pytest.raises(ValueError, match="delivered more than once"):
        embed_cells(model, [b, b])
    with pytest.raises(ValueError, match="no batches"):
        embed_cells(model, [])
    with pytest.raises(TypeError, match="cell_embedding"):
        embed_cells(torch.nn.Linear(2, 2), [b])


def test_zarr_and_h5ad_round_trip(tmp_path) -> None:
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    joinids = np.array([3, 5, 8, 13], dtype=np.int64)
    X = rng.normal(size=(4, 6)).astype(np.float32)
    write_zarr(tmp_path / "e.zarr", joinids, X, attrs={"checkpoint": "ckpt/step_10"})
    ids2, X2, attrs = read_zarr(tmp_path / "e.zarr")
    assert (ids2 == joinids).all() and np.array_equal(X2, X) and attrs["checkpoint"] == "ckpt/step_10"
    assert (tmp_path / "e.zarr" / "zarr.json").is_file()  # zarr format 3

    obs = pd.DataFrame({"cell_type": ["T", "B", "NK", "T", "B"]}, index=[13, 5, 3, 8, 99])
    write_h5ad(tmp_path / "e.h5ad", joinids, X, obs)
    a = ad.read_h5ad(tmp_path / "e.h5ad")
    assert list(a.obs["cell_type"]) == ["NK", "B", "T", "T"]  # aligned by soma_joinid, extra rows dropped
    assert list(a.obs["soma_joinid"]) == [3, 5, 8, 13]
    assert np.array_equal(a.obsm["X_scfm"], X)
    with pytest.raises(ValueError, match="disagree on N"):
        write_zarr(tmp_path / "bad.zarr", joinids[:3], X)


def test_embed_cells_under_bf16_autocast_matches_fp32_closely() -> None:
    """Under the trainer's autocast for train.precision=amp (fp32 weights, the forward in bf16) the embedding is
    close to the fp32 one but not equal to it (so the forward did run in bf16)."""
    from scfm_platform.config import from_dict
    from scfm_platform.engine import autocast

    model = _model("mean")
    batches = _batches()
    _, X32 = embed_cells(model, batches)
    with autocast(from_dict({"data": {"atlas": "unused"}, "train": {"precision": "amp"}}), torch.device("cpu")):
        _, X16 = embed_cells(model, batches)
    assert X16.dtype == np.float32 and np.isfinite(X16).all()
    rel = np.linalg.norm(X16 - X32) / np.linalg.norm(X32)
    assert 0 < rel < 3e-2, rel
    assert next(model.parameters()).dtype == torch.float32  # weights untouched
