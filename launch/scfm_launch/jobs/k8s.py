"""status, logs and cancel of a run submitted with the chart: the RayJob and its pods, through the Kubernetes API."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from scfm_launch.errors import UsageError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TIMEOUT = 15  # seconds per API request (not per log stream)
T = TypeVar("T")


def api_client(context: str | None) -> Any:
    """An ApiClient from the kubeconfig (KUBECONFIG or ~/.kube/config, `context` or the current one), else
    the in-cluster service account. Connection failures are not retried: a down API server fails at once."""
    import os

    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    conf = client.Configuration()
    try:
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, context=context, client_configuration=conf
        )
    except (ConfigException, FileNotFoundError) as e:
        if context is not None or "KUBERNETES_SERVICE_HOST" not in os.environ:
            where = f"context {context!r}" if context else "a current context"
            raise UsageError(f"no usable kubeconfig with {where} ({e}); set KUBECONFIG or pass --context") from None
        config.load_incluster_config(client_configuration=conf)
    conf.retries = 0
    return client.ApiClient(conf)


def namespace_of(namespace: str | None, context: str | None) -> str:
    """`namespace`, else the kubeconfig context's namespace, else 'default'."""
    if namespace:
        return namespace
    import os

    from kubernetes import config

    try:
        contexts, current = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG") or None)
    except Exception:  # no kubeconfig: api_client reports it
        return "default"
    chosen = next((c for c in contexts if c["name"] == context), None) if context else current
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


def call(fn: Callable[..., T], what: str, namespace: str, name: str, *args: Any, **kw: Any) -> T:
    """Call a client method, turning connection and HTTP errors into one-line UsageErrors."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kw)
    except ApiException as e:
        if e.status == 404 and "the server could not find the requested resource" in (e.body or ""):
            raise UsageError("KubeRay is not installed in the cluster (no ray.io/v1 RayJob kind)") from None
        if e.status == 404:
            raise UsageError(
                f"no {what} {name!r} in namespace {namespace!r} (`kubectl get rayjobs -n {namespace}`)"
            ) from None
        if e.status in (401, 403):
            raise UsageError(f"the API server refused access to {what} {name!r} in {namespace!r}: {e.reason}") from None
        raise UsageError(f"Kubernetes API error {e.status} on {what} {name!r}: {e.reason}") from None
    except HTTPError as e:
        host = getattr(getattr(fn, "__self__", None), "api_client", None)
        url = host.configuration.host if host is not None else "the API server"
        raise UsageError(
            f"cannot reach the Kubernetes API at {url}: {type(e).__name__}. Check `kubectl cluster-info`"
        ) from None


def get_rayjob(api: Any, namespace: str, name: str) -> dict[str, Any]:
    """The RayJob object as a dict."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    return call(
        custom.get_namespaced_custom_object,
        "RayJob",
        namespace,
        name,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        _request_timeout=TIMEOUT,
    )


def describe(rayjob: dict[str, Any]) -> str:
    """What `launch status` prints for a RayJob: job and deployment status, cluster, times, message."""
    meta, spec, st = rayjob.get("metadata", {}), rayjob.get("spec", {}), rayjob.get("status", {}) or {}
    groups = (spec.get("rayClusterSpec") or {}).get("workerGroupSpecs") or []
    desired = sum(int(g.get("replicas") or 0) for g in groups)
    ready = (st.get("rayClusterStatus") or {}).get("readyWorkerReplicas", 0)
    lines = [
        f"job:         {meta.get('name')} (namespace {meta.get('namespace', '?')})",
        f"status:      {st.get('jobStatus') or 'PENDING'} (deployment: {st.get('jobDeploymentStatus') or 'New'})",
        f"ray cluster: {st.get('rayClusterName') or '-'}, workers ready {ready}/{desired}",
    ]
    for key, label in (("dashboardURL", "dashboard"), ("startTime", "started"), ("endTime", "ended")):
        if st.get(key):
            lines.append(f"{label + ':':<12} {st[key]}")
    if st.get("reason") or st.get("message"):
        lines.append(f"message:     {' '.join(x for x in (st.get('reason'), st.get('message')) if x)}")
    return "\n".join(lines)


def log_pod(api: Any, namespace: str, name: str) -> tuple[str, str]:
    """(pod, container) to read the run's output from: the submitter pod (it tails the Ray job's logs) in
    K8sJobMode, else the Ray head."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    pods = call(
        core.list_namespaced_pod,
        "pods of RayJob",
        namespace,
        name,
        namespace,
        label_selector=f"job-name={name}",
        _request_timeout=TIMEOUT,
    ).items
    if pods:
        newest = max(pods, key=lambda p: p.metadata.creation_timestamp)
        return newest.metadata.name, newest.spec.containers[0].name
    cluster = (get_rayjob(api, namespace, name).get("status") or {}).get("rayClusterName")
    if cluster:
        heads = call(
            core.list_namespaced_pod,
            "head pod of RayJob",
            namespace,
            name,
            namespace,
            label_selector=f"ray.io/cluster={cluster},ray.io/node-type=head",
            _request_timeout=TIMEOUT,
        ).items
        if heads:
            return heads[0].metadata.name, "ray-head"
    raise UsageError(f"RayJob {name!r} has no pods yet; try `launch status {name} -n {namespace}` in a moment")


def stream_logs(api: Any, namespace: str, name: str, follow: bool) -> Iterator[str]:
    """Lines of the run's output, following them until the pod ends when `follow`."""
    from kubernetes import client

    pod, container = log_pod(api, namespace, name)
    print(f"[pod {pod}, container {container}]", file=sys.stderr)
    core = client.CoreV1Api(api)
    resp = call(
        core.read_namespaced_pod_log,
        "pod",
        namespace,
        pod,
        pod,
        namespace,
        container=container,
        follow=follow,
        _preload_content=False,
        _request_timeout=None if follow else TIMEOUT,
    )
    try:
        for chunk in resp.stream(decode_content=True):
            yield chunk.decode(errors="replace")
    finally:
        resp.release_conn()


def cancel(api: Any, namespace: str, name: str) -> None:
    """Delete the RayJob; KubeRay then deletes its Ray cluster and submitter Job."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    body = client.V1DeleteOptions(propagation_policy="Foreground")
    call(
        custom.delete_namespaced_custom_object,
        "RayJob",
        namespace,
        name,
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        body=body,
        _request_timeout=TIMEOUT,
    )
