"""`launch logs JOB [-f]`: a submitted run's output (the RayJob's submitter or head pod, or the Ray job's logs)."""

from __future__ import annotations

import argparse
import sys

from scfm_launch.commands._common import subparser
from scfm_launch.jobs.args import add_target_args

HELP = "print (or follow) the output of a submitted run"
EXAMPLES = """  launch logs h200-160m-8k -f -n scfm
  launch logs demo-20250101-120000-ab12 --address http://127.0.0.1:8265
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "logs", HELP, EXAMPLES)
    p.add_argument("job", metavar="JOB", help="job name printed by `launch submit`")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    add_target_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.address:
        from scfm_launch.jobs import ray_jobs

        chunks = ray_jobs.logs(args.address, args.job, args.follow)
    else:
        from scfm_launch.jobs import k8s

        chunks = k8s.stream_logs(
            k8s.api_client(args.context), k8s.namespace_of(args.namespace, args.context), args.job, args.follow
        )
    for chunk in chunks:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0
