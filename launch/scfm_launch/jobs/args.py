"""Command-line options shared by submit, status, logs and cancel: where the run lives."""

from __future__ import annotations

import argparse


def add_target_args(p: argparse.ArgumentParser) -> None:
    """--namespace/--context (Kubernetes) and --address (a Ray cluster's dashboard)."""
    k8s = p.add_argument_group("Kubernetes (the default)")
    k8s.add_argument(
        "-n",
        "--namespace",
        help="namespace (submit: cluster.namespace; status/logs/cancel: the context's, else 'default')",
    )
    k8s.add_argument("--context", help="kubeconfig context (default: the current one)")
    ray = p.add_argument_group("Ray cluster")
    ray.add_argument("--address", help="Ray dashboard URL, e.g. http://127.0.0.1:8265: use the Ray Jobs API")
