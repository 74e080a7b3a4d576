"""`launch atlas` end to end on real stores: demo, ingest, info, tokenize, and one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import zarr
from conftest_data import random_counts, write_h5ad

from scfm_data_service import DataError, atlas_info
from scfm_launch.commands import atlas as atlas_cmd


def launch(argv: list[str]) -> int:
    """Run `launch ARGV` in-process: through the real CLI once `atlas` is registered, else via its parser."""
    from scfm_launch import cli

    if "atlas" in cli.COMMANDS:
        return cli.main(argv)
    p = argparse.ArgumentParser(prog="launch")
    atlas_cmd.register(p.add_subparsers(dest="command"))
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        print(f"launch {args.command}: error: {e}", file=sys.stderr)
        return 2


def test_atlas_commands_end_to_end(tmp_path, capsys):
    uri = str(tmp_path / "atlas")
    assert launch(["atlas", "demo", uri, "--synthetic-cells", "200", "--quiet"]) == 0
    rng = np.random.default_rng(0)
    f = write_h5ad(tmp_path / "extra.h5ad", random_counts(rng, 25, 4), ["NEW1", "CD3E", "NEW2", "LYZ"])
    assert launch(["atlas", "ingest", uri, str(f), "--quiet"]) == 0
    info = atlas_info(uri)
    assert info["cells"] == 925 and [d["dataset_id"] for d in info["datasets"]][-1] == "extra"
    capsys.readouterr()
    assert launch(["atlas", "info", uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cells"] == 925
    assert launch(["atlas", "info", uri]) == 0
    out = capsys.readouterr().out
    assert "pbmc68k_reduced" in out and "CD14+ Monocyte" in out and "925 cells" in out
    tokens = tmp_path / "tokens.zarr"
    assert launch(["atlas", "tokenize", uri, "--out", str(tokens), "--max-len", "64", "--quiet"]) == 0
    root = zarr.open_group(str(tokens), mode="r")
    assert root.metadata.zarr_format == 3
    assert root.attrs["max_len"] == 64 and root["offsets"].shape == (926,)
    assert np.diff(root["offsets"][:]).max() == 64


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    uri = str(tmp_path / "atlas")
    bad = write_h5ad(tmp_path / "bad.h5ad", -np.ones((2, 2), np.float32), ["g1", "g2"])
    assert launch(["atlas", "ingest", uri, str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad.h5ad" in err and "negative" in err
    assert not (tmp_path / "atlas").exists()
    assert launch(["atlas", "info", str(tmp_path / "nowhere")]) == 2
    assert "not an atlas" in capsys.readouterr().err


def test_cli_module_imports_light():
    code = (
        "import sys, argparse; import scfm_launch.commands.atlas as a; "
        "a.register(argparse.ArgumentParser().add_subparsers()); "
        "heavy = [m for m in ('torch', 'ray', 'tiledbsoma', 'zarr', 'anndata') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
