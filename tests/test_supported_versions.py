"""The transformers range pyproject.toml declares is the range `.ci/run` tests, and the installed one is in it."""

from __future__ import annotations

import re
from pathlib import Path

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def declared_transformers_range() -> SpecifierSet:
    pyproject = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"transformers(?P<spec>[<>=!~][^"]*)"', pyproject)
    assert match, "pyproject.toml declares no transformers requirement"
    return SpecifierSet(match["spec"])


def test_ci_oldest_pin_is_the_declared_lower_bound():
    constraints = (ROOT / ".ci" / "constraints-oldest.txt").read_text()
    pinned = re.search(r"^transformers==(\S+)$", constraints, re.MULTILINE)
    assert pinned, ".ci/constraints-oldest.txt pins no transformers version"
    lower = [Version(spec.version) for spec in declared_transformers_range() if spec.operator == ">="]
    assert lower == [Version(pinned[1])], "the CI's oldest leg must test exactly pyproject.toml's lower bound"


def test_installed_transformers_is_in_the_declared_range():
    assert Version(transformers.__version__) in declared_transformers_range()
