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
"""Smoke tests of the benchmark scripts' `--quick` runs: JSON schema and positive numbers, not their values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_mhc_training_benchmark_quick(tmp_path):
    out = tmp_path / "mhc_training.json"
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_mhc_training.py"),
            "--quick",
            "--no-plot",
            "--output",
            str(out),
        ],
        check=True,
        timeout=300,
    )
    report = json.loads(out.read_text())

    for key in ("benchmark", "command", "setup", "summary", "runs", "sinkhorn_memory"):
        assert key in report, key
    implementations = {"llama", "mhc", "mhc_recompute", "lucidrains", "dsv4"}

    # The side-by-side table: one row per (hidden, threads, implementation), ratios to Llama.
    rows = report["summary"]
    assert {row["implementation"] for row in rows} == implementations
    for row in rows:
        for key in (
            "time_ratio",
            "time_ratio_paired_median",
            "time_ratio_min",
            "cpu_time_ratio",
            "memory_ratio",
        ):
            assert _positive(row[key]), (row["implementation"], key, row[key])
        if row["implementation"] == "llama":
            assert row["time_ratio"] == row["memory_ratio"] == 1.0

    for run in report["runs"]:
        assert set(run["memory"]) == implementations
        for mem in run["memory"].values():
            for key in ("activation_bytes", "peak_bytes", "saved_bytes", "memory_ratio", "peak_memory_ratio"):
                assert _positive(mem[key]), key
        for timing in run["timing"]:
            assert timing["threads"] >= 1
            for result in timing["results"].values():
                assert len(result["time_s"]) == report["setup"]["reps"]
                assert all(_positive(t) for t in result["time_s"])

    # Saved-for-backward bytes recorded per `sinkhorn_iterations` (their constancy is a property of the code,
    # checked by tests/test_mhc_ops.py; here only the schema).
    sinkhorn = report["sinkhorn_memory"]
    assert set(sinkhorn["model_saved_bytes"]) == {"10", "20", "40"}
    assert all(_positive(v) for v in sinkhorn["model_saved_bytes"].values())
    assert all(_positive(v) for v in sinkhorn["sinkhorn_op_saved_bytes"].values())
    assert isinstance(sinkhorn["constant"], bool)


@pytest.mark.slow
def test_mhc_training_benchmark_compiled_quick(tmp_path):
    """`--compile` times Llama and mHC each under `torch.compile`, ratios to compiled Llama (~90 s: compiling)."""
    out = tmp_path / "mhc_training.json"
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_mhc_training.py"),
            *("--quick", "--compile", "--implementations", "mhc", "--no-plot", "--output", str(out)),
        ],
        check=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    assert report["setup"]["compile"] is True
    rows = {row["implementation"]: row for row in report["compiled_summary"]}
    assert set(rows) == {"llama (compiled)", "mhc (compiled)"}
    assert rows["llama (compiled)"]["time_ratio"] == 1.0
    assert all(_positive(row["time_ratio"]) for row in rows.values())
    for run in report["runs"]:
        for result in run["compiled_timing"]["results"].values():
            assert len(result["time_s"]) == report["setup"]["reps"]
