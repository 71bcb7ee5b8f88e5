"""The `transformers-mhc` command line.

Each feature module contributes one sub-command through an ``add_subparser(subparsers)``
function that registers its arguments and sets ``func`` (called with the parsed namespace,
returning an exit code). Add a module to ``_SUBCOMMAND_MODULES`` to expose it here.

A user mistake (a bad argument, a missing or unwritable path, an unreachable Hub endpoint) ends with one
``transformers-mhc COMMAND: error: ...`` line on stderr and a non-zero exit code; ``--debug`` (or ``-v`` /
``--verbose``), anywhere on the command line, shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

# module path -> imported lazily so that `transformers-mhc --help` stays fast.
_SUBCOMMAND_MODULES: list[str] = [
    "transformers_mhc.quickstart",
    "transformers_mhc.conversion.cli",
    "transformers_mhc.evaluation.suite",
    "transformers_mhc.evaluation.synthetic",
    "transformers_mhc.hub",
]
DEBUG_FLAGS = ("--debug", "-v", "--verbose")


class ArgumentParser(argparse.ArgumentParser):
    """Reports a bad argument in one line (argparse prints the usage first) and exits with code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="transformers-mhc",
        description="Manifold-Constrained Hyper-Connections and decay linear attention for 🤗 transformers.",
    )
    parser.add_argument(
        *DEBUG_FLAGS,
        dest="debug",
        action="store_true",
        help="show tracebacks (accepted anywhere on the line)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_subparser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Taken out before parsing so that `transformers-mhc convert A B --debug` works like `--debug convert A B`.
    debug = any(arg in DEBUG_FLAGS for arg in argv)
    argv = [arg for arg in argv if arg not in DEBUG_FLAGS]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"transformers-mhc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place that turns any failure into one line
        if debug:
            raise
        print(f"transformers-mhc {args.command}: error: {describe_error(error)}", file=sys.stderr)
        return 1


def describe_error(error: BaseException) -> str:
    """One line: what failed, on which path or endpoint, and what to do."""
    if _is_connection_error(error):
        from huggingface_hub import constants

        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        return (
            f"could not reach the Hub at {endpoint} ({type(error).__name__}: {_one_line(error)}); check the network "
            f"connection, a proxy, or HF_ENDPOINT."
        )
    if isinstance(error, PermissionError):
        path = error.filename or "a path"
        return f"permission denied: {path}; choose a location you can write to (or fix its permissions)."
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror or _one_line(error)}: {error.filename}."
    return f"{type(error).__name__}: {_one_line(error)} (rerun with --debug for the traceback)."


def _is_connection_error(error: BaseException) -> bool:
    """httpx / requests transport failures, also when wrapped by huggingface_hub."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        module = type(error).__module__.split(".")[0]
        if module in ("httpx", "httpcore", "requests", "urllib3") and any(
            word in type(error).__name__ for word in ("Connect", "Timeout", "Network", "Transport", "Proxy")
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 500 else text[:497] + "..."


if __name__ == "__main__":
    sys.exit(main())
