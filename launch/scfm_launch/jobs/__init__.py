"""Sending runs to clusters: Helm + KubeRay on Kubernetes (`helm`, `k8s`), or an existing Ray cluster through
the Ray Jobs API (`ray_jobs`). `values` turns a run config into chart values. Nothing here is imported at CLI
start-up; each module imports kubernetes, ray or yaml inside its functions.
"""
