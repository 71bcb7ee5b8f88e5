"""The `transformers-mhc` command line.

Each feature module contributes one sub-command through an ``add_subparser(subparsers)``
function that registers its arguments and sets ``func`` (called with the parsed namespace,
returning an exit code). Add it to ``COMMANDS`` in ``transformers_mhc_cli`` (the light entry point that answers
``--help`` and ``--version`` without importing torch) to expose it here.

A user mistake (a bad argument, a missing or unwritable path, an unreachable Hub endpoint) ends with one
``transformers-mhc COMMAND: error: ...`` line on stderr and a non-zero exit code; ``--debug`` (or ``-v`` /
``--verbose``), anywhere on the command line, shows the traceback and sets transformers' logging to INFO;
``-q`` / ``--quiet`` to errors only.
"""

from __future__ import annotations

import importlib
import os
import sys

from transformers.utils import logging

from transformers_mhc_cli import COMMANDS, DEBUG_FLAGS, DESCRIPTION, QUIET_FLAGS, ArgumentParser, version


def build_parser(command: str | None = None) -> ArgumentParser:
    """The parser of every sub-command, or only of `command` (its module alone is imported: faster)."""
    parser = ArgumentParser(prog="transformers-mhc", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"transformers-mhc {version()}")
    parser.add_argument(
        *DEBUG_FLAGS,
        dest="debug",
        action="store_true",
        help="log more, show tracebacks (anywhere on the line)",
    )
    parser.add_argument(*QUIET_FLAGS, dest="quiet", action="store_true", help="log errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMANDS[command][0]] if command in COMMANDS else [module for module, _ in COMMANDS.values()]
    for module_name in dict.fromkeys(modules):  # `push` and `card` share a module
        importlib.import_module(module_name).add_subparser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Taken out before parsing so that `transformers-mhc convert A B --debug` works like `--debug convert A B`.
    debug = any(arg in DEBUG_FLAGS for arg in argv)
    quiet = any(arg in QUIET_FLAGS for arg in argv) and not debug
    argv = [arg for arg in argv if arg not in DEBUG_FLAGS + QUIET_FLAGS]
    # One logging path: transformers' (the package's modules log through `transformers.utils.logging`).
    if debug:
        logging.set_verbosity_info()
    elif quiet:
        logging.set_verbosity_error()
    parser = build_parser(next((arg for arg in argv if not arg.startswith("-")), None))
    args = parser.parse_args(argv)
    args.debug, args.quiet = debug, quiet
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
