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
"""Evaluation: the downstream suite on local data (through lm-eval) and synthetic recall tasks.

- :func:`write_task_folder` / ``transformers-mhc eval-tasks``: lm-eval task YAMLs running lm-eval's own
  BBH, GSM8K and MMLU tasks (and other lm-eval tasks given local files) on local data, for
  ``lm_eval --include_path`` / ``TaskManager(include_path=...)``.
- :func:`evaluate_model` / ``transformers-mhc eval``: the same tasks in one call, with the number of
  requests and an estimated time up front.
- :func:`mqar_batch`, :func:`induction_batch`, :func:`run_synthetic` / ``transformers-mhc synthetic``.
"""

from transformers_mhc.evaluation.local_tasks import write_task_folder
from transformers_mhc.evaluation.suite import evaluate_model, format_markdown
from transformers_mhc.evaluation.synthetic import induction_batch, mqar_batch, run_synthetic

__all__ = [
    "evaluate_model",
    "format_markdown",
    "induction_batch",
    "mqar_batch",
    "run_synthetic",
    "write_task_folder",
]
