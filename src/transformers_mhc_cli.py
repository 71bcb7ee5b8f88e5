# Copyright 2026 The transformers-mhc contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Entry point of the `transformers-mhc` command.

Importing `transformers_mhc` registers the models with transformers' Auto classes, which imports torch and
transformers (seconds). This module stands outside the package so that `transformers-mhc --help` and `--version`
answer at once; any sub-command runs `transformers_mhc.cli.main`, which imports only that sub-command's module.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from typing import NoReturn

# Sub-command -> (module that registers it with `add_subparser`, one-line summary for `--help`).
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "transformers_mhc.quickstart",
        "convert a small Llama to mHC, check it, fine-tune, generate, save and reload it (~15 s)",
    ),
    "convert": (
        "transformers_mhc.conversion.cli",
        "retrofit a pretrained Llama / Mistral / Qwen2 checkpoint with hyper-connections",
    ),
    "eval-tasks": (
        "transformers_mhc.evaluation.suite",  # registers `eval` and `eval-tasks`
        "write lm-eval task YAMLs for BBH, GSM8K, MMLU-Redux on local data (for lm_eval --include_path)",
    ),
    "eval": (
        "transformers_mhc.evaluation.suite",
        "downstream suite (BBH, GSM8K, MMLU-Redux, ...) on local data with lm-eval",
    ),
    "synthetic": (
        "transformers_mhc.evaluation.synthetic",
        "train small models on MQAR / induction heads on CPU and report recall accuracy",
    ),
    "push": (
        "transformers_mhc.hub",
        "upload a saved model (weights, config, code, tokenizer, card) to the Hub",
    ),
    "card": ("transformers_mhc.hub", "(re)write the README.md model card of a saved model folder"),
}
DEBUG_FLAGS = ("--debug", "-v", "--verbose")
QUIET_FLAGS = ("-q", "--quiet")
DESCRIPTION = "Manifold-Constrained Hyper-Connections and decay linear attention for 🤗 transformers."


class ArgumentParser(argparse.ArgumentParser):
    """Reports a bad argument in one line (argparse prints the usage first) and exits with code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def version() -> str:
    try:
        return metadata.version("transformers-mhc")
    except metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown (not installed)"


def overview_parser() -> argparse.ArgumentParser:
    """The top-level parser with one line per sub-command, built without importing any of them."""
    parser = ArgumentParser(prog="transformers-mhc", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"transformers-mhc {version()}")
    parser.add_argument(*DEBUG_FLAGS, dest="debug", action="store_true", help="log more, show tracebacks")
    parser.add_argument(*QUIET_FLAGS, dest="quiet", action="store_true", help="log errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        subparsers.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [arg for arg in argv if arg not in DEBUG_FLAGS + QUIET_FLAGS]
    if not words or words[0] in ("-h", "--help", "--version") or words[0] not in COMMANDS:
        parser = overview_parser()
        if not words:
            parser.print_help()
            return 2
        parser.parse_args(words)  # prints help / version, or the one-line error for an unknown command
        return 2
    from transformers_mhc.cli import main as run_command

    return run_command(argv)


if __name__ == "__main__":
    sys.exit(main())
