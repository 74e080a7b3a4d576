"""`launch`: the scfm command line.

Each subcommand lives in `scfm_launch.commands.<name>` and exposes `register(subparsers)`. Modules are imported
when the parser is built, so they must import nothing heavy (torch, ray, deepspeed, tiledbsoma, mlflow) at module
level: each handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# The CLI surface, in the order `launch --help` lists it. tests/unit/test_cli_surface.py pins it.
COMMANDS: tuple[str, ...] = ("run", "atlas", "validate", "eval", "compare", "submit", "status", "logs", "cancel")

EPILOG = """examples:
  launch run configs/demo.yaml train.steps=50
  launch run configs/demo.yaml --resume
  launch atlas demo atlases/demo --synthetic-cells 3000
  launch validate configs/demo.yaml model.attention=softmax
  launch eval runs/demo --data atlases/demo --label cell_type
  launch compare --experiment scfm --metric val_loss
  launch submit configs/h200_160m_8k.yaml --dry-run
  launch submit configs/demo.yaml --target ray --address http://127.0.0.1:8265
  launch status h200-160m-8k; launch logs h200-160m-8k -f; launch cancel h200-160m-8k
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch",
        description="scfm: pretrain single-cell foundation models with sigmoid attention.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in COMMANDS:
        importlib.import_module(f"scfm_launch.commands.{name}").register(sub)
    return parser


# Exceptions that mean "bad input", one per package. Looked up only among modules already imported, so checking
# costs nothing and pulls in nothing heavy.
_USER_ERRORS = (
    ("scfm_platform.errors", "ConfigError"),
    ("scfm_platform.errors", "RunError"),
    ("scfm_data_service.errors", "DataError"),
    ("scfm_launch.errors", "UsageError"),
)


def _user_error_types(*extra: type) -> tuple[type, ...]:
    found = [getattr(sys.modules[m], n) for m, n in _USER_ERRORS if m in sys.modules and hasattr(sys.modules[m], n)]
    return (*extra, *found)


def main(argv: list[str] | None = None) -> int:
    from scfm_launch.errors import UsageError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow options (`launch run c.yaml --resume train.steps=5`): argparse leaves
    # those for the positional it already filled, so they are collected here; anything else is an error.
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.parse_args(argv)  # reports the unrecognised arguments and exits 2
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        if not isinstance(e, _user_error_types(UsageError)):
            raise
        print(f"launch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"launch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
