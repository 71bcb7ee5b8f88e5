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
"""Smoke test of `benchmarks/bench_mhc_inference.py --quick`: JSON schema and positive numbers, not their values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mhc_inference.py"
MODELS = {"llama", "mhc", "mhc_none"}
SECTIONS = {"prefill", "decode", "generate"}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_mhc_inference_benchmark_quick(tmp_path):
    out = tmp_path / "mhc_inference.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--output", str(out)], check=True, timeout=300)
    report = json.loads(out.read_text())

    for key in ("benchmark", "command", "setup", "environment", "summary", "runs"):
        assert key in report, key
    assert report["setup"]["quick"] is True
    for key in ("torch", "transformers", "transformers_mhc", "python", "load_average_start"):
        assert key in report["environment"], key

    # The side-by-side table: one row per (hidden, section, model), ratios to Llama.
    rows = report["summary"]
    assert {row["section"] for row in rows} == SECTIONS
    assert {row["model"] for row in rows} == MODELS
    assert len(rows) == len(report["runs"]) * len(SECTIONS) * len(MODELS)
    for row in rows:
        for key in ("median_time_s", "time_ratio", "time_ratio_paired_median", "time_ratio_min"):
            assert _positive(row[key]), (row["section"], row["model"], key, row[key])
        if row["model"] == "llama":
            assert row["time_ratio"] == row["time_ratio_paired_median"] == row["time_ratio_min"] == 1.0

    setup = report["setup"]
    for run in report["runs"]:
        assert set(run["params"]) == MODELS and all(_positive(p) for p in run["params"].values())
        assert run["params"]["mhc_none"] == run["params"]["llama"]  # the sanity row is Llama's size
        assert set(run["sections"]) == SECTIONS
        for name, sec in run["sections"].items():
            assert set(sec["results"]) == MODELS
            # prefill and generate: one time per repetition; decode: one per repetition and step
            expected = setup["reps"] * (setup["decode_steps"] if name == "decode" else 1)
            for result in sec["results"].values():
                assert len(result["time_s"]) == expected, name
                assert all(_positive(t) for t in result["time_s"])
