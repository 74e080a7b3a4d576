"""`launch cancel JOB`: stop a submitted run (delete its RayJob, or stop the Ray job)."""

from __future__ import annotations

import argparse

from scfm_launch.commands._common import subparser
from scfm_launch.jobs.args import add_target_args

HELP = "stop a submitted run"
EXAMPLES = """  launch cancel h200-160m-8k -n scfm
  launch cancel demo-20250101-120000-ab12 --address http://127.0.0.1:8265
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "cancel", HELP, EXAMPLES)
    p.add_argument("job", metavar="JOB", help="job name printed by `launch submit`")
    add_target_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.address:
        from scfm_launch.jobs import ray_jobs

        stopped = ray_jobs.cancel(args.address, args.job)
        print(f"{args.job}: {'stop requested' if stopped else 'already finished'}")
        return 0
    from scfm_launch.jobs import k8s

    ns = k8s.namespace_of(args.namespace, args.context)
    k8s.cancel(k8s.api_client(args.context), ns, args.job)
    print(f"{args.job}: RayJob deleted; KubeRay removes its Ray cluster. MLflow and its data stay with the Helm")
    print(f"release (`helm uninstall {args.job} -n {ns}` removes the release; the MLflow PVC is kept).")
    return 0
