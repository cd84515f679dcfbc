"""The ``backdoor-gate`` command line.

Each subcommand module adds itself with ``register(subparsers)`` and sets ``func`` to a
callable ``(args) -> int`` (the exit code). This is the top layer: it imports every package's
commands plainly, and nothing imports it.
"""

from __future__ import annotations

import argparse
import sys

import backdoor_gate.detector_cli
import components.cli
import components.trainer.cli
import lab.cli
import pipelines.cli
from detector import __version__

#: Modules that contribute subcommands, in help order.
_SUBCOMMAND_MODULES = (backdoor_gate.detector_cli, lab.cli, components.trainer.cli, components.cli, pipelines.cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backdoor-gate",
        description="Detect backdoored face-recognition networks from their weights and gate their promotion.",
    )
    parser.add_argument("--version", action="version", version=f"backdoor-gate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _SUBCOMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
