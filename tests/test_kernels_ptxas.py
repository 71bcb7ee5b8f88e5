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
"""Offline sm_90 compiles of every kernel (`benchmarks/ptxas_spills.py`, its default run: decay kernels at
K = V in {64, 128, 256}, both decay granularities, bf16, fp32 and fp32 with TF32 products, every launch configuration their autotuners may
pick; mHC kernels at n = 4, every variant their launchers compile): they compile, and no kernel spills registers
to local memory (about 15 minutes on a CPU, hence `slow`; the script prints the full table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ptxas_spills.py"
DECAY_KERNELS = 8
AUTOTUNED_DECAY_KERNELS = {
    "_chunk_state_fwd_kernel",
    "_chunk_state_bwd_kernel",
    "_fused_recurrent_fwd_kernel",
}


@pytest.mark.slow
def test_no_spills_on_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler")
    output = tmp_path / "ptxas.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(output), "--arch", "90"],
        capture_output=True,
        text=True,
        timeout=3600,  # a few hundred compiles: about 15 minutes on one free core
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    kernels = report["kernels"]
    assert not report["errors"]
    decay = [row for row in kernels if row["family"] == "decay"]
    shapes = {(row["kernel"], row["dtype"], row["head_dim"], row["vector"]) for row in decay}
    # 8 decay kernels x 2 granularities x 3 head dims x 3 dtypes, each with one row per launch configuration.
    assert len(shapes) == DECAY_KERNELS * 2 * 3 * 3
    for kernel, dtype, head_dim, vector in shapes:
        launches = {
            row["launch"]
            for row in decay
            if (row["kernel"], row["dtype"], row["head_dim"], row["vector"])
            == (kernel, dtype, head_dim, vector)
        }
        # Autotuned kernels: several candidates, fewer at large head dims where wide tiles spill (one for the fp32
        # state kernels there); the others: one launch.
        if kernel in AUTOTUNED_DECAY_KERNELS:
            assert len(launches) > 1 or head_dim > 64, (kernel, dtype, head_dim, launches)
        else:
            assert len(launches) == 1, (kernel, dtype, head_dim, launches)
    # Every variant the mHC launchers compile at n = 4 (`kernels.mhc.compile_jobs`), per dtype.
    from transformers_mhc.kernels.mhc import compile_jobs

    expected_mhc = len(compile_jobs(4, torch.bfloat16)) + len(compile_jobs(4, torch.float32))
    assert len([row for row in kernels if row["family"] == "mhc"]) == expected_mhc
    for row in kernels:
        assert 0 < row["registers"] <= 255, row
    spilling = {
        (row["kernel"], row["dtype"], row.get("head_dim"), row.get("vector"))
        for row in kernels
        if row["spill_store_bytes"] or row["spill_load_bytes"]
    }
    assert not spilling, sorted(spilling)
