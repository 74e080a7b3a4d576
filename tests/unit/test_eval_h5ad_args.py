"""`launch eval --data FILE.h5ad`: its options, and the training atlas it needs (no checkpoint, no atlas here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scfm_launch.cli import build_parser
from scfm_platform.config import load_config
from scfm_platform.errors import RunError


def test_eval_parses_h5ad_options() -> None:
    args = build_parser().parse_args(
        ["eval", "runs/demo", "--data", "donor.h5ad", "--atlas", "/mnt/atlas", "--use-raw", "--label", "annot"]
    )
    assert (args.data, args.atlas, args.use_raw, args.label) == ("donor.h5ad", "/mnt/atlas", True, "annot")
    args = build_parser().parse_args(["eval", "runs/demo", "--data", "atlases/demo"])
    assert args.atlas is None and args.use_raw is False


def test_training_atlas_synthetic_or_missing_is_one_line(tmp_path: Path) -> None:
    from scfm_platform.eval.evaluate import _training_atlas

    ckpt = tmp_path / "checkpoint_00000004"
    synthetic = load_config(None, ["data.atlas=synthetic:100"])
    with pytest.raises(RunError, match=r"trained on the synthetic stream \(data.atlas=synthetic:100\).*--atlas") as e:
        _training_atlas(ckpt, synthetic, None)
    assert "\n" not in str(e.value)
    moved = load_config(None, [f"data.atlas={tmp_path / 'moved'}"])
    with pytest.raises(RunError, match=r"moved \(from the run's data.atlas in .*run.json\) is missing.*--atlas PATH"):
        _training_atlas(ckpt, moved, None)
    with pytest.raises(RunError, match=r"gone \(from --atlas\) is missing"):
        _training_atlas(ckpt, moved, str(tmp_path / "gone"))
