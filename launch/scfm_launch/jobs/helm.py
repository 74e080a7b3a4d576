"""Running the helm binary on the scfm chart, with its failures turned into one-line, actionable errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from scfm_launch.errors import UsageError

HELM_HELP = "install helm 3 (https://helm.sh/docs/intro/install/) or set SCFM_HELM=/path/to/helm"


def find_helm() -> str:
    """$SCFM_HELM, else `helm` on PATH, else the copy the test helper caches (~/.cache/scfm/tools/helm)."""
    env = os.environ.get("SCFM_HELM")
    if env:
        if Path(env).is_file() and os.access(env, os.X_OK):
            return env
        raise UsageError(f"SCFM_HELM={env} is not an executable file; {HELM_HELP}")
    for c in (shutil.which("helm"), str(Path.home() / ".cache/scfm/tools/helm")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise UsageError(f"helm not found; {HELM_HELP}")


def chart_dir() -> Path:
    """helm/scfm of this checkout ($SCFM_CHART overrides)."""
    chart = Path(os.environ.get("SCFM_CHART") or Path(__file__).resolve().parents[3] / "helm" / "scfm")
    if not (chart / "Chart.yaml").is_file():
        raise UsageError(f"chart not found at {chart}; set SCFM_CHART to the helm/scfm folder of an scfm checkout")
    return chart


def explain(stderr: str, context: str | None, namespace: str) -> str:
    """helm's error output as one line saying what to do."""
    text = " ".join(stderr.split())
    where = f"context {context!r}" if context else "the current kubeconfig context"
    if "context" in text and "does not exist" in text:
        return f"kubeconfig has no {where}; list them with `kubectl config get-contexts`"
    if "cluster unreachable" in text or "connection refused" in text or "no such host" in text:
        return f"cannot reach the Kubernetes cluster ({where}): {text[:300]}. Check `kubectl cluster-info`"
    if 'kind "RayJob"' in text or "ensure CRDs are installed" in text:
        return (
            "KubeRay is not installed in the cluster (no ray.io/v1 RayJob kind); install its operator: docs/cluster.md"
        )
    if "namespaces" in text and "not found" in text:
        return f"namespace {namespace!r} does not exist; create it (`kubectl create namespace {namespace}`)"
    if "forbidden" in text.lower():
        return f"the cluster refused ({where}, namespace {namespace!r}): {text[:300]}"
    return f"helm failed: {text[:500]}"


def run_helm(args: list[str], context: str | None, namespace: str, timeout: float = 300) -> str:
    """Run `helm ARGS`; stdout on success, UsageError with `explain`'s message on failure."""
    cmd = [find_helm(), *args, "--namespace", namespace]
    if context:
        cmd += ["--kube-context", context]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UsageError(f"helm did not answer within {timeout:.0f} s: {' '.join(cmd[1:3])}") from None
    if r.returncode != 0:
        raise UsageError(explain(r.stderr or r.stdout, context, namespace))
    return r.stdout


def _with_values(values: dict[str, Any]) -> tuple[str, tempfile.TemporaryDirectory[str]]:
    import yaml

    tmp = tempfile.TemporaryDirectory(prefix="scfm-values-")
    path = Path(tmp.name) / "values.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return str(path), tmp


def template(release: str, values: dict[str, Any], namespace: str) -> str:
    """The manifests `helm upgrade --install` would apply (no cluster needed)."""
    path, tmp = _with_values(values)
    with tmp:
        return run_helm(["template", release, str(chart_dir()), "-f", path], None, namespace)


def upgrade_install(release: str, values: dict[str, Any], namespace: str, context: str | None) -> str:
    """`helm upgrade --install` the run; returns helm's output (release notes)."""
    path, tmp = _with_values(values)
    with tmp:
        return run_helm(["upgrade", "--install", release, str(chart_dir()), "-f", path], context, namespace)
