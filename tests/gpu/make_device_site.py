"""Pack the Python packages the GPU machine lacks into `.devsite/part*.tar.xz` (cp312, x86-64, unpacked site dirs).

    .venv/bin/python tests/gpu/make_device_site.py [--out .devsite] [--keep-wheels]

The GPU machine has Python 3.12 with torch, triton, numpy, pandas, pyarrow, scipy, scikit-learn, matplotlib, numba,
aiohttp, grpcio, ... but no network. This script downloads (or builds: deepspeed ships only an sdist) the wheels of
everything else that `launch run`, `launch eval`, `launch compare` and `launch atlas demo` import, at the versions
of the development environment, unpacks them with their file modes (Ray's gcs_server and raylet must stay
executable), strips what is never run (Ray's Java jars and dashboard web client, MLflow's web UI, rllib, caches),
and writes xz tarballs:

    part1.tar.xz   site/ray                         (Ray, the largest package)
                   pandas2/                         (pandas 2.3, used there only if its pandas is >= 3, since
                                                     tiledbsoma and anndata need pandas < 3)
    part2.tar.xz   site/<everything else>

Each part fits one device call together with the repository (64 MiB); both fit no call together, so a first call
carries one part and unpacks it into /tmp, a second call on the same warm machine carries the other.

    .venv/bin/python tests/gpu/make_device_site.py --train-only

writes instead `part0-train.tar.xz`: Ray, DeepSpeed, MLflow and OmegaConf with their closure (and pandas 2, as
part1) but none of the atlas and evaluation packages (TRAIN_ONLY_SKIP), enough for `launch run` on a synthetic
atlas in a single call.

`tests/gpu/device_site.sh` unpacks whichever parts it finds into /tmp/site (and /tmp/site-pandas2). The pins
below are the closure of the run-time requirements for Python 3.12 on Linux, minus the packages the machine
already has (its list: numpy, pandas, pyarrow, scipy, scikit-learn, h5py, matplotlib, numba, aiohttp, click,
requests, pyyaml, protobuf, psutil, msgpack, jinja2, werkzeug, ...).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

RAY = ["ray==2.60.0"]
# Closure of ray[data,train], deepspeed, tiledbsoma, anndata, scanpy, zarr, mlflow (server: sqlite + uvicorn),
# omegaconf, igraph, leidenalg, umap-learn for cp312/Linux, without what the machine already has.
REST = [
    "alembic==1.20.1", "anndata==0.12.19", "annotated-types==0.8.0", "array-api-compat==1.16.0", "blinker==1.9.0",
    "cachetools==7.3.3", "cffi==2.1.1", "cryptography==50.0.2", "databricks-sdk==0.162.0", "docker==7.2.0",
    "donfig==0.8.1.post1", "fastapi==0.165.0", "flask==3.1.3", "flask-cors==6.0.5", "gitdb==4.0.12",
    "gitpython==3.2.1", "google-auth==2.63.0", "google-crc32c==1.9.0", "graphene==3.4", "graphql-core==3.2.14",
    "graphql-relay==3.2.0", "gunicorn==26.2.0", "hjson==3.1.0", "huey==3.5.4", "igraph==1.0.0",
    "importlib-metadata==9.1.0", "itsdangerous==2.2.0", "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1",
    "legacy-api-wrap==1.5", "leidenalg==0.12.0", "mako==1.4.3", "mlflow==3.17.2", "mlflow-skinny==3.17.2",
    "mlflow-tracing==3.17.2", "more-itertools==11.2.1", "natsort==8.4.0", "numcodecs==0.16.6", "omegaconf==2.4.0",
    "opentelemetry-api==1.45.2", "opentelemetry-proto==1.45.2", "opentelemetry-sdk==1.45.2",
    "opentelemetry-semantic-conventions==0.66b2", "prettytable==3.18.0", "pyarrow-hotfix==0.7", "pyasn1==0.6.5",
    "pyasn1-modules==0.4.2", "pycparser==3.12", "pydantic==2.14.4", "pydantic-core==2.50.5", "pynndescent==0.7.0",
    "python-dotenv==1.2.4", "referencing==0.37.0", "rpds-py==2026.9.1", "scanpy==1.11.5", "scverse-misc==0.0.3",
    "session-info2==0.4.1", "shapely==2.2.0", "skops==0.16.0", "smmap==5.0.3", "somacore==1.0.29",
    "sqlalchemy==2.1.9", "sqlparse==0.6.1", "starlette==1.10.0", "tensorboardx==2.6.5", "texttable==1.7.2",
    "tiledbsoma==2.3.0", "typing-extensions==4.16.0", "typing-inspection==0.4.5", "umap-learn==0.5.12",
    "uvicorn==0.54.0", "wcwidth==0.9.4", "zarr==3.1.6",
]  # fmt: skip
# Left out of the train-only part: what only atlases (tiledbsoma, anndata, zarr) and evaluation (scanpy, UMAP,
# Leiden clustering) import; `launch run` on a synthetic atlas imports none of it.
TRAIN_ONLY_SKIP = {
    "anndata", "array-api-compat", "donfig", "google-crc32c", "igraph", "legacy-api-wrap", "leidenalg", "natsort",
    "numcodecs", "pynndescent", "scanpy", "scverse-misc", "session-info2", "shapely", "somacore", "texttable",
    "tiledbsoma", "umap-learn", "zarr",
}  # fmt: skip
PANDAS2 = ["pandas==2.3.3", "pytz==2026.6", "tzdata==2026.6"]  # pandas 2 needs pytz and tzdata (pandas 3 does not)
DEEPSPEED = "deepspeed==0.19.8"  # sdist only: built here into a py3-none-any wheel (no compiled ops)

# The machine's glibc is recent; pip matches each manylinux tag exactly, so name the common ones.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]

# Paths (relative to a site dir) removed after unpacking: never imported by our runs.
STRIP = [
    "ray/jars",  # Java workers
    "ray/dashboard/client",  # the dashboard's web client (our runs start Ray without the dashboard)
    "ray/rllib",  # reinforcement learning library
    "mlflow/server/js",  # MLflow's web UI (the server's REST API and /health need none of it)
]
STRIP_SUFFIXES = (".map", ".pyc")
# Ray's native binaries ship their full symbol tables (~35 MB): `strip --strip-unneeded` keeps what loading and
# linking need (.dynsym). Only these: libraries that auditwheel patched are left as they are.
STRIP_SYMBOLS = ["ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet"]


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd[:8]), "…" if len(cmd) > 8 else "", flush=True)
    subprocess.run(cmd, check=True)


def download(pins: list[str], dest: Path) -> None:
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    common = ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    pip(*common, *plat, "-d", str(dest), "-q", *pins)


def build_deepspeed(dest: Path) -> None:
    if list(dest.glob("deepspeed-*.whl")):
        return
    env = dict(os.environ, DS_BUILD_OPS="0")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), DEEPSPEED]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def unpack(wheel: Path, site: Path) -> None:
    """Unzip keeping the file modes stored in the wheel (the `unzip` command restores them)."""
    site.mkdir(parents=True, exist_ok=True)
    subprocess.run(["unzip", "-q", "-o", str(wheel), "-d", str(site)], check=True)


def strip(site: Path) -> None:
    for rel in STRIP:
        shutil.rmtree(site / rel, ignore_errors=True)
    for rel in STRIP_SYMBOLS:
        if (site / rel).exists() and shutil.which("strip"):
            subprocess.run(["strip", "--strip-unneeded", str(site / rel)], check=True)
    for p in list(site.rglob("*")):
        if p.is_dir() and p.name == "__pycache__":
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and p.name.endswith(STRIP_SUFFIXES):
            p.unlink()


def wheels_for(pins: list[str], wheels: Path) -> list[Path]:
    out = []
    for pin in pins:
        name, version = pin.split("==")
        stem = name.replace("-", "_").lower()
        hits = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{stem}-{version}-")]
        if len(hits) != 1:
            raise SystemExit(f"expected one wheel for {pin} in {wheels}, found {[h.name for h in hits]}")
        out += hits
    return out


def pack(out: Path, name: str, stage: Path, tops: list[str]) -> Path:
    """tar + xz -9 on all cores (GNU tar keeps the file modes)."""
    path = out / name
    print(f"packing {path} ({', '.join(tops)})…", flush=True)
    cmd = ["tar", "-C", str(stage), "-I", "xz -9 -T0", "-cf", str(path.resolve()), *tops]
    subprocess.run(cmd, check=True)
    return path


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".devsite", help="output folder (ignored by git)")
    ap.add_argument("--keep-wheels", action="store_true", help="keep the downloaded wheels under OUT/wheels")
    ap.add_argument("--train-only", action="store_true", help="one part for `launch run` on a synthetic atlas")
    args = ap.parse_args()
    out = Path(args.out)
    wheels, stage = out / "wheels", out / "stage"
    wheels.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(stage, ignore_errors=True)
    download(RAY + REST + PANDAS2, wheels)
    build_deepspeed(wheels)

    deepspeed = sorted(wheels.glob("deepspeed-*.whl"))
    if args.train_only:
        train = [pin for pin in REST if pin.split("==")[0] not in TRAIN_ONLY_SKIP]
        # pandas 2 as in part1: Ray Data runs on it where the machine's pandas is 3.
        site = wheels_for(RAY + train, wheels) + deepspeed
        groups = {"part0-train.tar.xz": {"site": site, "pandas2": wheels_for(PANDAS2, wheels)}}
    else:
        groups = {
            "part1.tar.xz": {"site": wheels_for(RAY, wheels), "pandas2": wheels_for(PANDAS2, wheels)},
            "part2.tar.xz": {"site": wheels_for(REST, wheels) + deepspeed},
        }
    for part, tops in groups.items():
        pstage = stage / part.split(".")[0]
        for top, whls in tops.items():
            for w in whls:
                unpack(w, pstage / top)
            strip(pstage / top)
            print(f"  {part}: {top}/ holds {len(whls)} packages, {du(pstage / top) / 2**20:.1f} MiB unpacked")
        (out / part).unlink(missing_ok=True)
        pack(out, part, pstage, list(tops))
    shutil.rmtree(stage)
    if not args.keep_wheels:
        shutil.rmtree(wheels)
    total = 0
    for part in groups:
        size = (out / part).stat().st_size
        total += size
        print(f"{out / part}: {size / 2**20:.1f} MiB")
    print(f"total {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
