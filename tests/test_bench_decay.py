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
"""Smoke test of `benchmarks/bench_decay_linear_attn.py --quick`: JSON schema and positive numbers, not values."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decay_linear_attn.py"


def test_decay_benchmark_quick(tmp_path):
    out = tmp_path / "decay_linear_attn.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], check=True, timeout=300)
    result = json.loads(out.read_text())

    for key in ("config", "environment", "params", "train", "forward", "decode", "memory"):
        assert key in result, key
    assert result["config"]["quick"] is True

    train = result["train"]
    models = ("decay_scalar", "decay_vector", "mamba2_c256", "mamba2_c64", "llama")
    for name in models:
        assert train["tokens_per_s"][name] > 0
        assert train["step_seconds"][name] > 0
    for name in ("decay_scalar_vs_mamba2_c256", "decay_vector_vs_mamba2_c64", "decay_scalar_vs_llama"):
        assert train["ratios"][name] > 0

    forward = result["forward"]
    assert forward["rows"]
    for row in forward["rows"]:
        assert row["seq_len"] > 0 and row["llama_over_ours"] > 0
        assert row["seconds"]["decay_scalar"] > 0 and row["seconds"]["llama"] > 0
    assert "crossover_len" in forward and "skipped_lengths_over_budget" in forward

    decode = result["decode"]
    assert decode["ctx_long"] > decode["ctx_short"] > 0
    for name in ("decay_scalar", "decay_vector", "llama"):
        entry = decode["models"][name]
        for key in ("ms_per_token_short", "ms_per_token_long", "ratio_long_over_short"):
            assert entry[key] > 0

    memory = result["memory"]
    assert isinstance(memory["method"], str)
    assert len(memory["rows_bytes"]) >= 2
    for row in memory["rows_bytes"]:
        for name in ("decay_scalar", "decay_vector", "llama"):
            assert row[name] > 0
    for name in ("decay_scalar", "decay_vector", "llama"):
        assert len(memory["loglog_slopes"][name]) == len(memory["rows_bytes"]) - 1
