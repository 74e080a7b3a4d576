"""`launch submit`: send a run to Kubernetes (Helm chart → KubeRay RayJob) or to a Ray cluster (Ray Jobs API)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from scfm_launch.commands._common import add_config_args, subparser
from scfm_launch.jobs.args import add_target_args

if TYPE_CHECKING:
    from scfm_platform.config import RunConfig

HELP = "submit a run to Kubernetes (KubeRay RayJob via the helm chart) or to a Ray cluster"
EXAMPLES = """  launch submit configs/h200_160m_8k.yaml --dry-run          # print the manifests
  launch submit configs/h200_160m_8k.yaml cluster.worker_replicas=2 --namespace scfm
  launch submit configs/demo.yaml --target ray --address http://127.0.0.1:8265
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "submit", HELP, EXAMPLES)
    add_config_args(p)
    p.add_argument("--target", choices=("kubernetes", "ray"), help="where to run (default: cluster.target)")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    add_target_args(p)
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace, target: str | None) -> list[str]:
    extra = [f"cluster.target={target}"] if target else []
    extra += [f"cluster.address={args.address}"] if args.address else []
    extra += [f"cluster.namespace={args.namespace}"] if args.namespace else []
    extra += [f"cluster.context={args.context}"] if args.context else []
    return [*args.overrides, *extra]


def run(args: argparse.Namespace) -> int:
    from scfm_platform.config import load_config

    target = args.target or ("ray" if args.address else None)
    cfg = load_config(args.config, _overrides(args, target))
    if cfg.cluster.target == "local":  # `launch run` is the local path; submit means the cluster
        cfg = load_config(args.config, _overrides(args, "kubernetes"))
    if cfg.cluster.target == "ray":
        return _submit_ray(args, cfg)
    return _submit_kubernetes(args, cfg)


def _submit_kubernetes(args: argparse.Namespace, cfg: RunConfig) -> int:
    from scfm_launch.jobs import helm
    from scfm_launch.jobs.values import chart_values
    from scfm_platform.config import to_yaml

    ns, ctx = cfg.cluster.namespace, cfg.cluster.context
    values = chart_values(cfg, to_yaml(cfg))
    name = values["fullnameOverride"]
    if args.dry_run:
        print(helm.template(name, values, ns), end="")
        return 0
    helm.upgrade_install(name, values, ns, ctx)
    flags = f" -n {ns}" + (f" --context {ctx}" if ctx else "")
    print(f"job: {name}")
    print(f"submitted to namespace {ns} as Helm release {name} (KubeRay RayJob {name})")
    print(f"follow: launch status {name}{flags}\n        launch logs {name} -f{flags}")
    print(f"stop:   launch cancel {name}{flags}")
    if cfg.cluster.mlflow == "deploy":
        ctx_flag = f" --context {ctx}" if ctx else ""
        print(f"runs:   kubectl port-forward{ctx_flag} -n {ns} svc/{name}-mlflow 5000:5000, then http://localhost:5000")
    else:
        print(f"runs:   {cfg.tracking.uri}")
    return 0


def _submit_ray(args: argparse.Namespace, cfg: RunConfig) -> int:
    from scfm_launch.jobs import ray_jobs

    address = cfg.cluster.address
    entrypoint = ray_jobs.launch_command(["run", ray_jobs.config_arg(args.config), *args.overrides])
    if args.dry_run:
        import yaml

        print(f"address: {address}\nentrypoint: {entrypoint}")
        print(yaml.safe_dump({"runtime_env": ray_jobs.runtime_env()}, sort_keys=False), end="")
        return 0
    job_id = ray_jobs.submit(address, cfg.name, entrypoint)
    print(f"job: {job_id}")
    print(f"submitted to the Ray cluster at {address}: {entrypoint}")
    print(f"follow: launch status {job_id} --address {address}\n        launch logs {job_id} -f --address {address}")
    print(f"stop:   launch cancel {job_id} --address {address}")
    return 0
