"""Pieces shared by subcommands that take a run config."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scfm_platform.config import RunConfig


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """`CONFIG.yaml [key=value ...]`: the job's YAML and dotlist overrides."""
    parser.add_argument("config", metavar="CONFIG.yaml", help="run config (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config values, e.g. model.attention=softmax",
    )


def load_run_config(args: argparse.Namespace) -> RunConfig:
    """Load and validate the config named on the command line (raises ConfigError)."""
    from scfm_platform.config import load_config

    return load_config(args.config, args.overrides)


def subparser(sub: argparse._SubParsersAction, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand parser whose help ends with examples."""
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"examples:\n{examples}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
