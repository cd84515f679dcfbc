"""The ``backdoor-gate`` command line.

Each subcommand module adds itself with ``register(subparsers)`` and sets ``func`` to a
callable ``(args) -> int`` (the exit code). Modules of higher layers (faces/training,
pipelines, the MLflow gate) are imported only when the CLI is built, never by the detector
library itself.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from detector import __version__

#: Modules that contribute subcommands, in help order. Each has ``register(subparsers)``.
_SUBCOMMAND_MODULES = (
    "detector.commands",
    "detector.bench",
    "detector.faces.cli",
    "components.cli",
    "pipelines.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backdoor-gate",
        description="Detect backdoored face-recognition networks from their weights and gate their promotion.",
    )
    parser.add_argument("--version", action="version", version=f"backdoor-gate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not (name == e.name or name.startswith(f"{e.name}.")):
                raise  # a real missing dependency inside the module: say so loudly
            continue
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
