"""`launch submit/status/logs/cancel` for Kubernetes: values from the config, manifests that validate, and clear
errors from the real helm binary and the real Kubernetes client when no cluster is there.

No Kubernetes API server can run on these machines (none ships in a package), so the happy paths of helm
upgrade and of status/logs/cancel against a live cluster are not exercised here; everything up to the wire is.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helm_tools import helm_path, pod_templates, validate_manifest

from scfm_launch.errors import UsageError
from scfm_launch.jobs import k8s
from scfm_launch.jobs.names import job_name
from scfm_launch.jobs.values import chart_values, split_image
from scfm_platform.config import load_config, to_yaml
from scfm_platform.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
H200 = str(ROOT / "configs" / "h200_160m_8k.yaml")
MY_COMMANDS = ("submit", "status", "logs", "cancel")


def launch(*argv: str) -> int:
    """Run a subcommand the way `launch` does: parse, call, UsageError/ConfigError -> exit 2."""
    parser = argparse.ArgumentParser(prog="launch")
    sub = parser.add_subparsers(dest="command")
    for name in MY_COMMANDS:
        importlib.import_module(f"scfm_launch.commands.{name}").register(sub)
    args = parser.parse_args(list(argv))
    try:
        return int(args.func(args) or 0)
    except (UsageError, ConfigError) as e:
        print(f"launch {args.command}: error: {e}", file=sys.stderr)
        return 2


@pytest.fixture(autouse=True)
def helm_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCFM_HELM", str(helm_path()))


@pytest.fixture
def dead_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kubeconfig whose API server is a closed port on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "dead", "context": {"cluster": "c", "user": "u", "namespace": "research"}}],
                "current-context": "dead",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(cfg))
    return f"https://127.0.0.1:{port}"


def dry_run(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict]:
    import yaml

    assert launch("submit", H200, *argv, "--dry-run") == 0
    return [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]


def test_dry_run_renders_valid_manifests_from_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    manifests = dry_run(
        capsys,
        "cluster.atlas_pvc=atlas",
        "cluster.worker_replicas=3",
        "cluster.gpus_per_node=4",
        "cluster.node_selector={pool: h200}",
        "cluster.image=reg.example:5000/scfm:v1",
    )
    assert sorted(m["kind"] for m in manifests) == [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "RayJob",
        "Service",
    ]
    for m in manifests:
        validate_manifest(m)
    (job,) = [m for m in manifests if m["kind"] == "RayJob"]
    assert job["metadata"]["name"] == "h200-160m-8k"
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == 3
    pod = workers["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["containers"][0]["image"] == "reg.example:5000/scfm:v1"
    assert pod["nodeSelector"] == {"pool": "h200"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (cm,) = [m for m in manifests if m["kind"] == "ConfigMap"]
    import yaml

    shipped = yaml.safe_load(cm["data"]["config.yaml"])
    assert shipped["cluster"]["worker_replicas"] == 3 and shipped["model"]["preset"] == "160m"


def test_namespace_and_external_mlflow(capsys: pytest.CaptureFixture[str]) -> None:
    manifests = dry_run(
        capsys,
        "cluster.atlas_pvc=atlas",
        "cluster.mlflow=external",
        "tracking.uri=http://mlflow.tracking:5000",
        "--namespace",
        "research",
    )
    assert {m["kind"] for m in manifests} == {"ConfigMap", "RayJob"}
    (job,) = [m for m in manifests if m["kind"] == "RayJob"]
    assert "'tracking.uri=http://mlflow.tracking:5000'" in job["spec"]["entrypoint"]
    assert launch("submit", H200, "cluster.atlas_pvc=atlas", "cluster.mlflow=external", "--dry-run") == 2
    assert "tracking.uri is required" in capsys.readouterr().err


def test_storage_secret_is_referenced_by_name_only(capsys: pytest.CaptureFixture[str]) -> None:
    secret_value = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    os.environ["AWS_SECRET_ACCESS_KEY"] = secret_value  # present in the submitting shell, must go nowhere
    try:
        manifests = dry_run(capsys, "data.atlas=s3://atlases/cellxgene", "cluster.storage_secret=atlas-creds")
    finally:
        del os.environ["AWS_SECRET_ACCESS_KEY"]
    text = json.dumps(manifests)
    assert secret_value not in text and "Secret" not in {m["kind"] for m in manifests}
    (job,) = [m for m in manifests if m["kind"] == "RayJob"]
    for _, t in pod_templates(job):
        assert t["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "atlas-creds"}}]
    cfg = load_config(H200, ["data.atlas=s3://atlases/cellxgene", "cluster.storage_secret=atlas-creds"])
    values = chart_values(cfg, to_yaml(cfg))
    assert values["atlas"] == {"claimName": "", "uri": "s3://atlases/cellxgene", "secretName": "atlas-creds"}


def test_uris_with_passwords_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code = launch("submit", H200, "cluster.atlas_pvc=atlas", "tracking.uri=http://bob:hunter2@mlflow:5000", "--dry-run")
    err = capsys.readouterr().err
    assert code == 2 and "tracking.uri carries a password" in err and "hunter2" not in err


def test_local_atlas_without_pvc_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch("submit", str(ROOT / "configs" / "demo.yaml"), "--dry-run") == 2
    assert "is a local path, which pods cannot read" in capsys.readouterr().err
    assert launch("submit", H200, "cluster.atlas_pvc=atlas", "data.atlas=/mnt/atlas", "--dry-run") == 2
    assert "must be a path under /data" in capsys.readouterr().err


def test_unreachable_cluster_is_a_clear_error(dead_kubeconfig: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert launch("submit", H200, "cluster.atlas_pvc=atlas") == 2
    err = capsys.readouterr().err
    assert "cannot reach the Kubernetes cluster" in err and "kubectl cluster-info" in err
    assert launch("submit", H200, "cluster.atlas_pvc=atlas", "--context", "nope") == 2
    assert "get-contexts" in capsys.readouterr().err


def test_missing_helm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SCFM_HELM", "/nonexistent/helm")
    assert launch("submit", H200, "cluster.atlas_pvc=atlas", "--dry-run") == 2
    assert "is not an executable file; install helm 3" in capsys.readouterr().err


@pytest.mark.parametrize("command", [("status", "run1"), ("logs", "run1"), ("cancel", "run1")])
def test_k8s_commands_without_api_server(
    command: tuple[str, str], dead_kubeconfig: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert launch(*command, "-n", "scfm") == 2
    assert f"cannot reach the Kubernetes API at {dead_kubeconfig}" in capsys.readouterr().err


def test_k8s_commands_without_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert launch("status", "run1") == 2
    assert "no usable kubeconfig" in capsys.readouterr().err


def test_describe_rayjob_status() -> None:
    rayjob = {
        "metadata": {"name": "h200-160m-8k", "namespace": "scfm"},
        "spec": {"rayClusterSpec": {"workerGroupSpecs": [{"replicas": 2}, {"replicas": 1}]}},
        "status": {
            "jobStatus": "RUNNING",
            "jobDeploymentStatus": "Running",
            "rayClusterName": "h200-160m-8k-x7k2p",
            "rayClusterStatus": {"readyWorkerReplicas": 3},
            "startTime": "2025-01-01T12:00:00Z",
        },
    }
    out = k8s.describe(rayjob)
    assert "status:      RUNNING (deployment: Running)" in out
    assert "h200-160m-8k-x7k2p, workers ready 3/3" in out and "started:     2025-01-01T12:00:00Z" in out
    assert "status:      PENDING (deployment: New)" in k8s.describe({"metadata": {"name": "x"}})


def test_namespace_defaults_to_the_contexts(dead_kubeconfig: str) -> None:
    assert k8s.namespace_of(None, None) == "research"
    assert k8s.namespace_of("scfm", None) == "scfm"
    assert k8s.namespace_of(None, "no-such-context") == "default"


def test_cancel_builds_a_foreground_delete(dead_kubeconfig: str) -> None:
    from kubernetes import client

    api = k8s.api_client(None)
    assert api.configuration.host == dead_kubeconfig and api.configuration.retries == 0
    body = client.V1DeleteOptions(propagation_policy="Foreground")
    assert api.sanitize_for_serialization(body) == {"propagationPolicy": "Foreground"}


def test_job_names_and_images() -> None:
    assert job_name("H200 160M@8K") == "h200-160m-8k"
    assert job_name("8k_ablation") == "scfm-8k-ablation"
    long = job_name("a" * 80)
    assert len(long) == 47
    assert split_image("reg:5000/team/scfm:1.2") == ("reg:5000/team/scfm", "1.2")
    assert split_image("reg:5000/scfm") == ("reg:5000/scfm", "latest")
    assert split_image("scfm@sha256:abcd") == ("scfm", "sha256:abcd")


def test_command_modules_import_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "for m in ('submit', 'status', 'logs', 'cancel'):\n"
        "    __import__(f'scfm_launch.commands.{m}')\n"
        "heavy = [m for m in ('ray', 'kubernetes', 'yaml', 'torch', 'omegaconf') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
