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
"""House rules of the model code that a reader relies on, checked on the source text.

- Model files (`models/modeling_*.py`) hold no autograd machinery and no shared mutable state: no `global`, no
  saved-tensor hooks, no `torch.autograd.Function`, no class-level lists or dicts that instances write to.
- Every decoder layer's `forward` reads like transformers' own (`LlamaDecoderLayer`: ~15 lines): at most 20 lines
  of code, without its signature and docstring.
- No file of the package (`src/`, `conversion/`) grows past 650 lines: split it by responsibility instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "src" / "transformers_mhc" / "models"
MODEL_FILES = sorted(MODELS.glob("modeling_*.py"))
MAX_FILE_LINES = 650
MAX_LAYER_FORWARD_LINES = 20


def test_model_files_found():
    assert {p.name for p in MODEL_FILES} >= {"modeling_mhc.py", "modeling_decay_linear_attn.py"}


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_files_hold_no_autograd_machinery_or_shared_state(path):
    tree = ast.parse(path.read_text())
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            problems.append(f"line {node.lineno}: `global {', '.join(node.names)}`")
        if isinstance(node, ast.Attribute) and node.attr in ("saved_tensors_hooks", "Function"):
            problems.append(f"line {node.lineno}: `{ast.unparse(node)}`")
        if isinstance(node, ast.ClassDef):
            # An empty class-level container is a registry that every instance shares and writes to (filled ones,
            # such as transformers' `_no_split_modules`, are read-only declarations).
            for statement in node.body:
                value = statement.value if isinstance(statement, (ast.Assign, ast.AnnAssign)) else None
                empty_literal = isinstance(value, (ast.List, ast.Set, ast.Dict)) and not (
                    value.keys if isinstance(value, ast.Dict) else value.elts
                )
                empty_call = isinstance(value, ast.Call) and ast.unparse(value) in (
                    "list()",
                    "dict()",
                    "set()",
                )
                if empty_literal or empty_call:
                    problems.append(f"line {statement.lineno}: class-level `{ast.unparse(statement)}`")
    assert not problems, "\n".join(problems)


def _decoder_layers():
    for path in MODEL_FILES:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("DecoderLayer"):
                forward = next(f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "forward")
                yield pytest.param(path, forward, id=node.name)


@pytest.mark.parametrize(("path", "forward"), list(_decoder_layers()))
def test_decoder_layer_forward_is_short(path, forward):
    body = (
        forward.body[1:] if isinstance(forward.body[0], ast.Expr) else forward.body
    )  # without the docstring
    lines = path.read_text().splitlines()[body[0].lineno - 1 : forward.end_lineno]
    code = [line for line in lines if line.strip() and not line.strip().startswith("#")]
    assert len(code) <= MAX_LAYER_FORWARD_LINES, "\n".join(code)


def test_no_source_file_is_too_long():
    sources = [*(ROOT / "src").rglob("*.py"), *(ROOT / "conversion").rglob("*.py")]
    long = {
        str(p.relative_to(ROOT)): n
        for p in sources
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, long
