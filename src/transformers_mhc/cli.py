"""The `transformers-mhc` command line.

Each feature module contributes one sub-command through an ``add_subparser(subparsers)``
function that registers its arguments and sets ``func`` (called with the parsed namespace,
returning an exit code). Add a module to ``_SUBCOMMAND_MODULES`` to expose it here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> imported lazily so that `transformers-mhc --help` stays fast.
_SUBCOMMAND_MODULES: list[str] = [
    "transformers_mhc.quickstart",
    "transformers_mhc.conversion.cli",
    "transformers_mhc.evaluation.suite",
    "transformers_mhc.evaluation.synthetic",
    "transformers_mhc.hub",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformers-mhc",
        description="Manifold-Constrained Hyper-Connections and decay linear attention for 🤗 transformers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_subparser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
