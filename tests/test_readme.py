"""The README's code runs as written: every Python block is executed, every shell command is checked against the
command it calls (the long-running ones are run by their own tests: quickstart, convert, finetune, eval, push)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def shell_commands() -> list[list[str]]:
    """Each command line of the README's bash blocks, split into words, without env assignments and comments."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for command in re.split(r"&&|\|\|", line.split(" #")[0]):
                words = shlex.split(command.strip())
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words = words[1:]
                if words:
                    commands.append(words)
    return commands


PYTHON_BLOCKS = code_blocks("python")


def test_the_readme_has_code_to_check():
    assert len(PYTHON_BLOCKS) >= 2 and len(shell_commands()) >= 5


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(index, tmp_path):
    # In a fresh interpreter and an empty folder: whatever a block needs it must import or create itself.
    result = subprocess.run(
        [sys.executable, "-c", PYTHON_BLOCKS[index]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, f"README python block {index} failed:\n{result.stderr[-3000:]}"


def test_every_shell_command_names_a_real_command():
    cli = [sys.executable, "-m", "transformers_mhc.cli"]
    checked = set()
    for words in shell_commands():
        if words[0] == "transformers-mhc":
            target = (*cli, words[1], "--help")
        elif words[0] in ("python", "python3") and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), f"README runs {words[1]}, which does not exist"
            target = (sys.executable, str(ROOT / words[1]), "--help")
        elif words[0] == "torchrun":
            script = next(word for word in words if word.endswith(".py"))
            assert (ROOT / script).is_file(), f"README runs {script}, which does not exist"
            continue
        else:
            continue
        if target in checked:
            continue
        checked.add(target)
        result = subprocess.run(target, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"`{' '.join(words[:2])} --help` failed:\n{result.stderr[-2000:]}"
    assert len(checked) >= 4
