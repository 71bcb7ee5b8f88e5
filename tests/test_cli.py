"""The command line's entry point: `--help` and `--version` without importing torch, `python -m transformers_mhc`,
one-line errors, and the sub-command table matching what the modules register."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import transformers_mhc
import transformers_mhc_cli
from transformers_mhc.cli import build_parser


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_help_and_version_import_neither_torch_nor_transformers():
    probe = (
        "import sys, contextlib, io, transformers_mhc_cli as cli\n"
        "for argv in (['--help'], ['--version'], []):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        cli.main(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'transformers_mhc') if m in sys.modules))\n"
    )
    result = run("-c", probe)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_is_fast():
    start = time.perf_counter()
    result = run("-m", "transformers_mhc_cli", "--help")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0 and "quickstart" in result.stdout
    # < 1 s on an idle 2-core machine (about 0.3 s measured); generous here for a loaded CI machine.
    assert elapsed < 3.0


def test_version_matches_the_package():
    result = run("-m", "transformers_mhc", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"transformers-mhc {transformers_mhc.__version__}"


def test_unknown_command_is_one_line():
    result = run("-m", "transformers_mhc_cli", "frobnicate")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "invalid choice: 'frobnicate'" in result.stderr


@pytest.mark.parametrize("command", sorted(transformers_mhc_cli.COMMANDS))
def test_every_listed_command_is_registered_by_its_module(command):
    parser = build_parser(command)
    subparsers = next(action for action in parser._actions if action.dest == "command")
    assert command in subparsers.choices


def test_the_table_lists_every_registered_command():
    parser = build_parser()
    subparsers = next(action for action in parser._actions if action.dest == "command")
    assert set(subparsers.choices) == set(transformers_mhc_cli.COMMANDS)
