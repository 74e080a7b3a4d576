"""Bad input beyond test_data_atlas.py: through the real CLI, one line, exit 2, nothing half-written.

Truncated .h5ad, a string count matrix, a file whose obs is empty; `launch atlas info` and `launch run` on a path
that does not exist and on a directory that is not an atlas. A zero-length cell (no expressed gene) is kept by
ingest on purpose (empty droplets occur in real files): it becomes a CLS-only cell that the data service delivers
and the model trains on with a finite loss.
"""

from __future__ import annotations

import os
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from conftest_data import random_counts, tree_digest, write_h5ad

from scfm_data_service import DataConfig, ingest, iter_batches, read_obs
from scfm_data_service import schema as S

GENES = ["g1", "g2", "g3", "g4"]


def _launch(*args: str, cwd) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-m", "scfm_launch.cli", *args], capture_output=True, text=True, cwd=cwd,
                       env=env | {"PYTHONWARNINGS": "ignore"}, timeout=300)  # fmt: skip
    return p.returncode, p.stdout, p.stderr


def _one_line(code: int, err: str, command: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"launch {command}: error: "), err[-2000:]
    return lines[0]


def test_malformed_h5ad_through_the_cli_leaves_the_atlas_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    good = write_h5ad(tmp_path / "good.h5ad", random_counts(rng, 20, 4), GENES)
    blob = good.read_bytes()
    (tmp_path / "trunc.h5ad").write_bytes(blob[: len(blob) // 2])
    strings = np.array([["1", "2"], ["x", "4"]], dtype=object)
    anndata.AnnData(X=strings, var=pd.DataFrame(index=["g1", "g2"]), obs=pd.DataFrame(index=["a", "b"])).write_h5ad(
        tmp_path / "strings.h5ad"
    )
    anndata.AnnData(X=np.zeros((0, 2), np.float32), var=pd.DataFrame(index=["g1", "g2"])).write_h5ad(
        tmp_path / "noobs.h5ad"
    )
    atlas = tmp_path / "atlas"
    code, _, err = _launch("atlas", "ingest", str(atlas), str(good), "--quiet", cwd=tmp_path)
    assert code == 0, err[-2000:]
    before = tree_digest(atlas)
    cases = {"trunc.h5ad": "cannot read as .h5ad", "strings.h5ad": "not numeric", "noobs.h5ad": "no cells"}
    for name, want in cases.items():
        for target in (atlas, tmp_path / f"new-{name}"):
            code, _, err = _launch("atlas", "ingest", str(target), str(tmp_path / name), "--quiet", cwd=tmp_path)
            line = _one_line(code, err, "atlas")
            assert name in line and want in line, line
        assert tree_digest(atlas) == before, name
        assert not (tmp_path / f"new-{name}").exists(), name  # a bad first file never creates an atlas


def test_missing_or_wrong_atlas_is_one_line_for_info_and_run(tmp_path):
    (tmp_path / "notatlas").mkdir()
    (tmp_path / "notatlas" / "x.txt").write_text("hello")
    (tmp_path / "c.yaml").write_text("name: bad\nresources:\n  use_gpu: 'false'\n")
    for path, want in ((tmp_path / "nope", "not an atlas"), (tmp_path / "notatlas", "not an atlas")):
        line = _one_line(*_launch("atlas", "info", str(path), cwd=tmp_path)[::2], "atlas")
        assert str(path.name) in line and want in line, line
    for path, want in ((tmp_path / "nope", "no such atlas"), (tmp_path / "notatlas", "not an atlas")):
        code, _, err = _launch("run", "c.yaml", f"data.atlas={path}", "train.output_dir=runs", cwd=tmp_path)
        line = _one_line(code, err, "run")
        assert want in line, line
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_zero_length_cell_is_kept_and_trains_as_a_cls_only_cell(tmp_path):
    from scfm_platform.config import load_config
    from scfm_platform.model import build_model
    from scfm_platform.objective import masked_loss

    rng = np.random.default_rng(1)
    x = random_counts(rng, 12, 4)
    x[5] = 0  # cell zero-c5 expresses nothing
    uri = str(tmp_path / "atlas")
    ingest(uri, [write_h5ad(tmp_path / "zero.h5ad", x, GENES)], progress=False)
    obs = read_obs(uri, ["nnz"])
    assert len(obs) == 12 and int(obs["nnz"].min()) == 0
    data = DataConfig(atlas=uri, max_len=8, tokens_per_batch=64, max_cells_per_batch=4, val_fraction=0.0)
    batches = list(iter_batches(data, rank=0, world_size=1, epoch=0))
    ids = torch.cat([b[S.SOMA_JOINID] for b in batches]).tolist()
    assert sorted(ids) == list(range(12))  # every cell once, the empty one included
    zero_id = int(obs.index[obs["nnz"] == 0][0])  # read_obs is indexed by soma_joinid
    cfg = load_config(None, [f"data.atlas={uri}", "data.max_len=8", "model.preset=tiny", "model.depth=1"])
    torch.manual_seed(0)
    model = build_model(cfg, 3 + len(GENES))
    seen = False
    for b in batches:
        hit = (b[S.SOMA_JOINID] == zero_id).nonzero()
        if len(hit):
            seen = True
            assert int(b[S.SEQ_LENS][hit[0, 0]]) == 1 and int(b[S.GENE_IDS][hit[0, 0], 0]) == S.CLS_ID
        out = model(b[S.GENE_IDS], b[S.VALUES], b[S.SEQ_LENS], b[S.MASK])
        loss, _ = masked_loss(out, b, model.dims.value_encoding, model.dims.n_bins)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(out.h_BTD).all()
    assert seen
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.fixture(autouse=True)
def _cwd_independent(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
