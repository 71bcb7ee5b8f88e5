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
"""Stock tool first: lm-eval's own command line runs our local-data tasks on a converted checkpoint,
offline, with nothing but `--include_path` to the folder `transformers-mhc eval-tasks` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from transformers_mhc import cli  # noqa: E402
from transformers_mhc.conversion import convert_llama_to_mhc  # noqa: E402

BBH_TASK = "sports_understanding"  # short prompts: cheap generations on CPU


@pytest.mark.parametrize(
    "extra",
    [
        # The command exactly as users type it: up to 1024 chain-of-thought tokens per question, ~45 s here with
        # the cached generation of transformers 5.24. The capped variant checks that lm-eval's --gen_kwargs reach
        # the model.
        pytest.param([], id="as-is"),
        pytest.param(["--gen_kwargs", "max_gen_toks=8"], id="capped", marks=pytest.mark.slow),
    ],
)
def test_lm_eval_cli_runs_a_local_bbh_task_on_a_converted_stories260k(
    stories260k_path, data_dir, tmp_path, extra
):
    converted = tmp_path / "stories-mhc"
    convert_llama_to_mhc(stories260k_path, converted, num_streams=4, verify=False)
    task = f"local_bbh_cot_fewshot_{BBH_TASK}"
    tasks = tmp_path / "tasks"
    argv = ["eval-tasks", "--data-dir", str(data_dir), "--output", str(tasks), "--tasks", task]
    assert cli.main(argv) == 0

    output = tmp_path / "results"
    model_args = f"pretrained={converted},trust_remote_code=True"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args]
    command += ["--include_path", str(tasks), "--tasks", task, "--limit", "2", "--device", "cpu"]
    command += ["--output_path", str(output), "--log_samples", *extra]
    # As a user runs it: offline, and without the Triton interpreter conftest turns on for kernel tests.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    (results_file,) = output.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["n-samples"][task] == {"original": 250, "effective": 2}  # the local file's 250 questions
    assert 0.0 <= results["results"][task]["exact_match,get-answer"] <= 1.0
    config = results["configs"][task]
    assert config["dataset_kwargs"]["data_files"] == {
        "test": str(data_dir.resolve() / "bbh" / f"{BBH_TASK}.json")
    }
    assert results["config"]["model_args"] == {"pretrained": str(converted), "trust_remote_code": True}

    (samples_file,) = output.rglob(f"samples_{task}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    local_docs = json.loads((data_dir / "bbh" / f"{BBH_TASK}.json").read_text())["examples"][:2]
    assert [s["doc"] for s in samples] == local_docs
    for sample in samples:  # lm-eval's own 3-shot chain-of-thought prompt around the local question
        prompt, generation_kwargs = sample["arguments"]["gen_args_0"].values()
        assert prompt.count("Let's think step by step.") == 4 and sample["doc"]["input"] in prompt
        assert generation_kwargs["until"] == ["</s>", "Q", "\n\n"]
        assert generation_kwargs["max_gen_toks"] == (8 if extra else 1024)
