"""`launch status JOB`: where a submitted run stands (RayJob on Kubernetes, or a Ray job with --address)."""

from __future__ import annotations

import argparse

from scfm_launch.commands._common import subparser
from scfm_launch.jobs.args import add_target_args

HELP = "show the status of a submitted run"
EXAMPLES = """  launch status h200-160m-8k -n scfm
  launch status demo-20250101-120000-ab12 --address http://127.0.0.1:8265
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "status", HELP, EXAMPLES)
    p.add_argument("job", metavar="JOB", help="job name printed by `launch submit`")
    add_target_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.address:
        from scfm_launch.jobs import ray_jobs

        print(ray_jobs.describe(ray_jobs.status(args.address, args.job), args.address))
        return 0
    from scfm_launch.jobs import k8s

    ns = k8s.namespace_of(args.namespace, args.context)
    print(k8s.describe(k8s.get_rayjob(k8s.api_client(args.context), ns, args.job)))
    return 0
