"""`launch validate`: load a run config with overrides, check it, print it resolved."""

from __future__ import annotations

import argparse

from scfm_launch.commands._common import add_config_args, load_run_config, subparser

HELP = "check a run config and print it resolved"
EXAMPLES = """  launch validate configs/demo.yaml
  launch validate configs/h200_160m_8k.yaml model.attention=softmax train.grad_clip=0
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "validate", HELP, EXAMPLES)
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scfm_platform.config import redacted_yaml

    cfg = load_run_config(args)
    print(redacted_yaml(cfg), end="")  # secrets masked, URI credentials stripped
    return 0
