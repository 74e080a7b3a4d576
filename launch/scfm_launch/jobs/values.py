"""Chart values for helm/scfm, rendered from a run config's `cluster` section.

Only references to credentials ever go into values: the Secret's name (`cluster.storage_secret`). A URI that
carries a password is refused, because the config lands in a ConfigMap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from scfm_launch.errors import UsageError
from scfm_launch.jobs.names import job_name

if TYPE_CHECKING:
    from scfm_platform.config import RunConfig

ATLAS_MOUNT = "/data"  # where the chart mounts cluster.atlas_pvc
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def split_image(image: str) -> tuple[str, str]:
    """'reg:5000/scfm:1.2' -> ('reg:5000/scfm', '1.2'); 'scfm@sha256:ab' -> ('scfm', 'sha256:ab'); no tag: 'latest'."""
    if "@" in image:
        repo, _, digest = image.partition("@")
        return repo, digest
    head, _, last = image.rpartition("/")
    if ":" in last:
        name, _, tag = last.partition(":")
        return (f"{head}/{name}" if head else name), tag
    return image, "latest"


def _refuse_credentials(key: str, uri: str | None) -> None:
    if uri and "://" in uri and urlsplit(uri).password:
        raise UsageError(
            f"{key} carries a password; it would land in a ConfigMap. Put credentials in the Secret named by "
            "cluster.storage_secret (e.g. MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY) and drop them from the URI"
        )


def check_for_kubernetes(cfg: RunConfig) -> None:
    """Refuse configs that cannot run in pods: local atlas paths without a PVC, credentials in URIs."""
    c, atlas = cfg.cluster, cfg.data.atlas
    _refuse_credentials("tracking.uri", cfg.tracking.uri)
    _refuse_credentials("data.atlas", atlas)
    if c.atlas_pvc:
        if not atlas.startswith(ATLAS_MOUNT + "/") and atlas != ATLAS_MOUNT:
            raise UsageError(
                f"data.atlas={atlas!r} must be a path under {ATLAS_MOUNT} when cluster.atlas_pvc is set "
                f"(the PVC is mounted there), e.g. data.atlas={ATLAS_MOUNT}/atlas"
            )
    elif "://" not in atlas:
        raise UsageError(
            f"data.atlas={atlas!r} is a local path, which pods cannot read: set cluster.atlas_pvc=<PVC name> "
            f"(mounted at {ATLAS_MOUNT}) or use an object-store URI such as data.atlas=s3://bucket/atlas"
        )


def chart_values(cfg: RunConfig, config_yaml: str) -> dict[str, Any]:
    """Values for `helm upgrade --install` of one run; `config_yaml` is the resolved config for the ConfigMap."""
    check_for_kubernetes(cfg)
    c = cfg.cluster
    repository, tag = split_image(c.image)
    limits = {"cpu": str(c.cpus_per_node), "memory": c.memory_per_node}
    tolerations = list(c.tolerations) or ([GPU_TOLERATION] if c.gpus_per_node else [])
    return {
        "fullnameOverride": job_name(cfg.name),
        "image": {"repository": repository, "tag": tag, "pullPolicy": c.image_pull_policy},
        "config": config_yaml,
        "shm": {"sizeLimit": c.shm_size},
        "checkpoints": {"claimName": c.checkpoint_pvc or ""},
        "atlas": {
            "claimName": c.atlas_pvc or "",
            "uri": "" if c.atlas_pvc else cfg.data.atlas,
            "secretName": c.storage_secret or "",
        },
        "mlflow": {"mode": c.mlflow, "externalUri": (cfg.tracking.uri or "") if c.mlflow == "external" else ""},
        "workerGroups": [
            {
                "groupName": "gpu" if c.gpus_per_node else "cpu",
                "replicas": c.worker_replicas,
                "gpus": c.gpus_per_node,
                "rayStartParams": {},
                "resources": {"requests": dict(limits), "limits": dict(limits)},
                "nodeSelector": dict(c.node_selector),
                "tolerations": tolerations,
                "affinity": {},
                "securityContext": {},
                "volumes": [],
                "volumeMounts": [],
                "annotations": {},
            }
        ],
    }
