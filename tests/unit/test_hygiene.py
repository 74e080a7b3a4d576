"""Repository hygiene: import-linter contracts hold and the packages import cleanly on their own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_import_linter_contracts_hold() -> None:
    exe = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(exe)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_import_linter_catches_a_violation(tmp_path: Path) -> None:
    """The contracts are live: a data-service module that imports the platform is reported broken."""
    bad = REPO / "data_service" / "scfm_data_service" / "_contract_probe.py"
    bad.write_text("import scfm_platform.errors  # noqa: F401\n")
    try:
        exe = Path(sys.executable).with_name("lint-imports")
        out = subprocess.run([str(exe), "--no-cache"], capture_output=True, text=True, cwd=REPO)
    finally:
        bad.unlink()
    assert out.returncode != 0
    assert "BROKEN" in out.stdout


@pytest.mark.parametrize("pkg", ["scfm_kernels", "scfm_data_service", "scfm_platform", "scfm_launch"])
def test_package_imports_alone(pkg: str) -> None:
    out = subprocess.run([sys.executable, "-c", f"import {pkg}"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
