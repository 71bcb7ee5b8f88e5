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
"""Checkpoints written by an earlier version load into today's models and give the same logits.

The fixtures (`tests/fixtures/checkpoints`, written by `tests/fixtures/make_regression_checkpoints.py` at main
cabd670) cover every hyper-connection mode and convention and the decay model's cache-state variants; a renamed
parameter, a changed initialisation that leaks into loading, or a changed formula fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import transformers_mhc  # noqa: F401  (registers the Auto classes)

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINTS = sorted(p.name for p in (FIXTURES / "checkpoints").iterdir() if p.is_dir())
# The same inputs as the fixture script: one full row, one left-padded row.
INPUT_IDS = torch.tensor([[5, 17, 3, 42, 8, 63, 1, 30, 12], [0, 0, 9, 2, 55, 7, 7, 21, 40]])
ATTENTION_MASK = torch.tensor([[1] * 9, [0, 0] + [1] * 7])


def test_fixtures_present():
    assert len(CHECKPOINTS) == 8, CHECKPOINTS


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_old_checkpoint_gives_identical_logits(name):
    path = FIXTURES / "checkpoints" / name
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model).__module__.startswith("transformers_mhc."), type(model)
    with torch.no_grad():
        logits = model(INPUT_IDS, attention_mask=ATTENTION_MASK).logits
    expected = load_file(str(path / "expected_logits.safetensors"))["logits"]
    # Identical up to fp32 summation order (a refactor may reorder a reduction); any formula change is far larger.
    torch.testing.assert_close(logits, expected, atol=2e-6, rtol=2e-6)
