"""`launch compare` / `launch eval` command modules: light to import, examples in help; tracking URI precedence."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "deepspeed", "tiledbsoma", "mlflow", "zarr", "scanpy", "anndata", "matplotlib", "sklearn")


def test_command_modules_import_nothing_heavy() -> None:
    code = (
        "import argparse, sys\n"
        "from scfm_launch.commands import compare, eval\n"
        "p = argparse.ArgumentParser(); s = p.add_subparsers()\n"
        "compare.register(s); eval.register(s)\n"
        "import scfm_platform.eval.compare, scfm_platform.eval.evaluate\n"  # the pipeline modules are light too
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("name", ["compare", "eval"])
def test_help_has_examples(name: str, capsys) -> None:
    import importlib

    mod = importlib.import_module(f"scfm_launch.commands.{name}")
    parser = argparse.ArgumentParser(prog="launch")
    mod.register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args([name, "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and f"launch {name}" in text.split("examples:")[1]
    assert "\n" not in mod.HELP


def test_compare_rejects_experiment_and_runs_together() -> None:
    from scfm_launch.commands import compare
    from scfm_launch.errors import UsageError

    parser = argparse.ArgumentParser(prog="launch")
    compare.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--experiment", "x", "--runs", "a", "b"])
    with pytest.raises(UsageError, match="not both"):
        args.func(args)


def test_tracking_uri_precedence(tmp_path, monkeypatch) -> None:
    from scfm_platform.eval.runs import default_tracking_uri, resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = resolve_tracking_uri(None)
    assert local == default_tracking_uri() and local.startswith("sqlite:///") and local.endswith("mlruns/mlflow.db")
    assert str(tmp_path.resolve()) in local
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
