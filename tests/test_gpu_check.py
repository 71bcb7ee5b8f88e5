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
"""`benchmarks/gpu_check.py` keeps working: its `--cpu` mode (the Triton interpreter, tiny shapes) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
KERNELS = {
    "sinkhorn_knopp",
    "mhc_coefficients",
    "hc_pre_mix",
    "hc_res_post_mix",
    "chunk_simple_scalar",
    "chunk_gla_vector",
    "recurrent_decode",
}


@pytest.mark.triton
def test_gpu_check_cpu_mode(tmp_path):
    existing = tmp_path / "gpu_check.json"
    existing.write_text("{}\n")  # a committed result: never replaced without --overwrite
    # Without the flag this test process set: the script must set it itself, as when a person runs it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(existing), "--cpu", "--compile-models", "--profile-models"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert existing.read_text() == "{}\n"
    report = json.loads((tmp_path / "gpu_check-2.json").read_text())

    assert report["mode"] == "cpu-interpreter" and report["all_ok"] and not report["failures"]
    assert not report["skipped"]
    assert {row["kernel"] for row in report["kernels"]} == KERNELS
    for row in report["kernels"]:
        assert row["ok"] and row["max_rel_error"] <= 2e-2, row
        assert {"out0", "grad0"} <= set(row["errors"])
        assert row["torch_ms"] > 0 and row["triton_ms"] > 0
    assert {row["model"] for row in report["models"]} == {"mhc_n4", "plain_residual", "decay_vector_mhc_n2"}
    for row in report["models"]:
        assert row["ok"] and row["generated_tokens_equal"] == row["generated_tokens"] > 0, row
        assert row["grad_rel_error"] <= 1e-4
        assert row["torch_compiled_train_step_ms"] > 0 and row["triton_compiled_train_step_ms"] > 0
        profile = row["triton_profile"]
        assert profile["wall_ms"] > 0 and profile["ops_issued"] > 0 and profile["top_by_host"]
    assert report["mhc_overhead_vs_plain"] > 0 and report["mhc_overhead_vs_plain_compiled"] > 0
    # The kernels are registered ops: one sub-layer's mHC ops and the decay chunk op compile whole (aot_eager here).
    assert sorted(row["case"].split()[0] for row in report["compiled"]) == ["chunk_decay", "mhc_sublayer"]
    for row in report["compiled"]:
        assert row["ok"] and row["max_rel_error"] <= 1e-5, row
    assert report["peers"] == []  # fla needs CUDA


@pytest.mark.triton
def test_bf16_models_are_judged_against_fp32():
    """In 16-bit both paths round; each is compared with an fp32 step, and the kernels may not round much worse."""
    from conftest import KERNEL_DEVICE

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    model_class, config_kwargs = gpu_check._model_configs(cpu=True)["mhc_n4"]
    setup = dict(batch=1, seq=12, new_tokens=2, dtype="bf16")
    row = gpu_check._check_model(
        "mhc_n4", model_class, config_kwargs, setup, KERNEL_DEVICE, timer=lambda fn: (fn(), 1.0)[1]
    )
    assert row["ok"], row
    assert 0 < row["torch_grad_error_vs_fp32"] < 0.1 and row["triton_grad_error_vs_fp32"] < 0.1
