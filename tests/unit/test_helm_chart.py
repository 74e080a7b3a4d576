"""The helm/scfm chart: lint, render, and validate every object against the Kubernetes and KubeRay schemas."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helm_tools import CHART, helm, pod_templates, render, validate_manifest

CI_VALUES = CHART / "ci" / "ci-values.yaml"


def validate_core(obj: dict) -> None:
    assert obj["apiVersion"] != "ray.io/v1"
    validate_manifest(obj)


def validate_rayjob(obj: dict) -> None:
    assert obj["kind"] == "RayJob"
    validate_manifest(obj)


@pytest.fixture(scope="module")
def ci_manifests() -> list[dict]:
    return render(CI_VALUES)


def by_kind(manifests: list[dict], kind: str) -> list[dict]:
    return [m for m in manifests if m["kind"] == kind]


def test_helm_lint_strict_default_and_ci_values() -> None:
    for extra in ([], ["-f", str(CI_VALUES)]):
        r = helm("lint", str(CHART), "--strict", *extra, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "0 chart(s) failed" in r.stdout


def test_every_rendered_object_validates(ci_manifests: list[dict]) -> None:
    kinds = sorted(m["kind"] for m in ci_manifests)
    assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "RayJob", "Service"]
    for m in ci_manifests:
        if m["apiVersion"] == "ray.io/v1":
            validate_rayjob(m)
        else:
            validate_core(m)


def test_default_values_render_and_validate() -> None:
    for m in render(release="scfm"):
        validate_rayjob(m) if m["kind"] == "RayJob" else validate_core(m)


def test_worker_groups_gpus_scheduling_and_volumes(ci_manifests: list[dict]) -> None:
    (job,) = by_kind(ci_manifests, "RayJob")
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu, cpu = groups["gpu"], groups["cpu"]
    assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"] == 2
    (c,) = gpu["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert c["resources"]["limits"]["memory"] == "64Gi"
    assert gpu["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    for _, t in pod_templates(job):
        vols = {v["name"]: v for v in t["spec"]["volumes"]}
        assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
        assert vols["config"]["configMap"]["name"] == "ci-run-config"
        assert vols["atlas"]["persistentVolumeClaim"] == {"claimName": "atlas-ci", "readOnly": True}
        mounts = {m["mountPath"]: m for m in t["spec"]["containers"][0]["volumeMounts"]}
        assert {"/dev/shm", "/etc/scfm", "/tmp", "/scratch", "/data", "/checkpoints"} <= set(mounts)
        assert mounts["/data"]["readOnly"] is True


def test_security_contexts_everywhere(ci_manifests: list[dict]) -> None:
    (job,) = by_kind(ci_manifests, "RayJob")
    (mlflow,) = by_kind(ci_manifests, "Deployment")
    pods = [t["spec"] for _, t in pod_templates(job)] + [mlflow["spec"]["template"]["spec"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]


def test_group_security_context_overrides_shared_one() -> None:
    manifests = render(CI_VALUES, sets=("head.securityContext.readOnlyRootFilesystem=false",))
    (job,) = by_kind(manifests, "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert head["securityContext"]["readOnlyRootFilesystem"] is False
    assert head["securityContext"]["allowPrivilegeEscalation"] is False
    assert worker["securityContext"]["readOnlyRootFilesystem"] is True


def test_job_entrypoint_and_config(ci_manifests: list[dict]) -> None:
    (job,) = by_kind(ci_manifests, "RayJob")
    (cm,) = by_kind(ci_manifests, "ConfigMap")
    spec = job["spec"]
    assert spec["entrypoint"] == (
        "launch run /etc/scfm/config.yaml 'tracking.uri=http://ci-run-mlflow.scfm.svc:5000' "
        "'train.output_dir=/checkpoints' 'train.steps=3'"
    )
    assert spec["submissionMode"] == "K8sJobMode" and spec["activeDeadlineSeconds"] == 3600
    assert "name: ci-run" in cm["data"]["config.yaml"]
    assert "atlas: /data/atlas" in cm["data"]["config.yaml"]


def test_atlas_from_object_store_with_secret_reference_only(tmp_path: Path) -> None:
    secret_value = "wJalrXUtnFEMI-K7MDENG-EXAMPLEKEY"
    values = tmp_path / "v.yaml"
    values.write_text(
        "config: |\n  name: s3run\n  data:\n    atlas: s3://bucket/atlas\n"
        "atlas:\n  uri: s3://bucket/atlas\n  secretName: atlas-credentials\n"
    )
    manifests = render(values, release="s3run")
    text = json.dumps(manifests)
    assert secret_value not in text and "Secret" not in {m["kind"] for m in manifests}
    (job,) = by_kind(manifests, "RayJob")
    assert "'data.atlas=s3://bucket/atlas'" in job["spec"]["entrypoint"]
    for _, t in pod_templates(job):
        c = t["spec"]["containers"][0]
        assert c["envFrom"] == [{"secretRef": {"name": "atlas-credentials"}}]
        assert "atlas" not in {v["name"] for v in t["spec"]["volumes"]}


def test_external_mlflow_renders_no_server(tmp_path: Path) -> None:
    manifests = render(CI_VALUES, sets=("mlflow.mode=external", "mlflow.externalUri=http://mlflow.example:5000"))
    assert {m["kind"] for m in manifests} == {"ConfigMap", "RayJob"}
    (job,) = by_kind(manifests, "RayJob")
    assert "'tracking.uri=http://mlflow.example:5000'" in job["spec"]["entrypoint"]
    r = helm("template", "x", str(CHART), "--set", "mlflow.mode=external", check=False)
    assert r.returncode != 0 and "mlflow.externalUri is required" in r.stderr


def test_long_names_are_truncated() -> None:
    release = "a-very-long-release-name-for-an-ablation-run-" + "x" * 8  # 53 characters: helm's release limit
    manifests = render(CI_VALUES, release=release, sets=("fullnameOverride=",))
    for m in manifests:
        assert len(m["metadata"]["name"]) <= 63, m["metadata"]["name"]
        for v in m["metadata"].get("labels", {}).values():
            assert len(str(v)) <= 63
    (job,) = by_kind(manifests, "RayJob")
    assert len(job["metadata"]["name"]) <= 47
    validate_rayjob(job)


def test_rayjob_schema_is_strict(ci_manifests: list[dict]) -> None:
    (job,) = by_kind(ci_manifests, "RayJob")
    bad = json.loads(json.dumps(job))
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2  # typo of replicas
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        validate_rayjob(bad)
    bad = json.loads(json.dumps(job))
    bad["spec"]["submissionMode"] = "K8sMode"
    with pytest.raises(jsonschema.ValidationError):
        validate_rayjob(bad)
    bad = json.loads(json.dumps(job))
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_rayjob(bad)


def test_tracking_only_release_renders_mlflow_alone() -> None:
    manifests = render(release="scfm-tracking", sets=("job.enabled=false",))
    assert sorted(m["kind"] for m in manifests) == ["Deployment", "PersistentVolumeClaim", "Service"]
    (svc,) = by_kind(manifests, "Service")
    assert svc["metadata"]["name"] == "scfm-tracking-mlflow"
    for m in manifests:
        validate_core(m)
