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
"""Evaluation results for model cards: lm-eval output or `{task: {metric: value}}` → `model-index` metadata.

`parse_eval_results` turns the forms users have at hand into `huggingface_hub.EvalResult`s (written by
`ModelCardData` as the card's `model-index`) and into the rows of the card's evaluation table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from huggingface_hub import EvalResult
from huggingface_hub.repocard_data import model_index_to_eval_results

EVAL_TASK_TYPE = "text-generation"
"""`task.type` of every `model-index` entry (all our models are causal language models)."""

# lm-eval result keys that are not metrics.
_LM_EVAL_NON_METRIC_KEYS = frozenset({"alias", "samples", "name", "sample_len", "sample_count"})
# `dataset_path` values of lm-eval tasks that read local files: they do not name a dataset.
_LOCAL_DATASET_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})


def _plain_scalar(value: Any) -> Any:
    """Turns numpy / torch scalars into Python ones (YAML cannot dump them)."""
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes)):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


def _metric_value(value: Any, where: str) -> float | int | str:
    value = _plain_scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{where}: a metric value must be a number or a string, got {value!r}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: a metric value must be finite, got {value!r}.")
    return value


def _format_number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _eval_row(result: EvalResult, stderr: Any = None) -> dict[str, str]:
    n_shot = (result.dataset_args or {}).get("num_few_shot")
    return {
        "task": result.dataset_name,
        "metric": result.metric_name or result.metric_type,
        "value": _format_number(result.metric_value),
        "stderr": _format_number(stderr) if isinstance(stderr, (int, float)) else "",
        "n_shot": "" if n_shot is None else str(n_shot),
    }


def parse_eval_results(
    eval_results: Mapping[str, Any] | Iterable[EvalResult] | Iterable[Mapping[str, Any]],
) -> tuple[list[EvalResult], list[dict[str, str]]]:
    """Normalises evaluation results into `EvalResult`s (for `model-index`) and rows for the card's table.

    Accepted forms:

    - `{task: {metric: value}}`, e.g. `{"gsm8k": {"exact_match": 0.31}}`;
    - the JSON written by lm-eval (`{"results": {task: {"acc,none": 0.5, "acc_stderr,none": 0.01, ...}},
      "configs": {...}, "n-shot": {...}}`): `metric,filter` keys are split, `*_stderr` values go to the table,
      the dataset path / config / split come from `configs` and the few-shot count from `n-shot`;
    - a list of `EvalResult`s, or a `model-index` list as found in card metadata.

    Raises `ValueError` naming the offending task and metric on malformed input.
    """
    if isinstance(eval_results, Mapping):
        return _parse_task_dict(eval_results)
    items = list(eval_results)
    if all(isinstance(item, EvalResult) for item in items):
        return items, [_eval_row(item) for item in items]
    if all(isinstance(item, Mapping) and "results" in item for item in items):
        try:
            _, results = model_index_to_eval_results([dict(item) for item in items])
        except (KeyError, TypeError) as error:
            raise ValueError(f"Invalid model-index in eval_results: missing {error}.") from error
        return results, [_eval_row(item) for item in results]
    raise ValueError(
        "`eval_results` must be a dict {task: {metric: value}}, lm-eval results JSON, a list of "
        f"`EvalResult` or a model-index list; got {type(eval_results).__name__}."
    )


def _parse_task_dict(eval_results: Mapping[str, Any]) -> tuple[list[EvalResult], list[dict[str, str]]]:
    lm_eval = isinstance(eval_results.get("results"), Mapping)
    tasks: Mapping[str, Any] = eval_results["results"] if lm_eval else eval_results
    configs: Mapping[str, Any] = (eval_results.get("configs") or {}) if lm_eval else {}
    n_shots: Mapping[str, Any] = (eval_results.get("n-shot") or {}) if lm_eval else {}
    if not tasks:
        raise ValueError("`eval_results` holds no task.")

    # Dataset identity of each task: lm-eval tasks sharing (path, config, split) would be merged into one
    # model-index entry, so those fall back to the task name.
    identity: dict[str, tuple[str, str | None, str | None]] = {}
    for task in tasks:
        config = configs.get(task) or {}
        path = config.get("dataset_path")
        if not isinstance(path, str) or path in _LOCAL_DATASET_BUILDERS:
            path = task
        name = config.get("dataset_name") if isinstance(config.get("dataset_name"), str) else None
        split = config.get("test_split") or config.get("validation_split")
        identity[task] = (path, name, split if isinstance(split, str) else None)
    counts: dict[tuple, int] = {}
    for key in identity.values():
        counts[key] = counts.get(key, 0) + 1

    results: list[EvalResult] = []
    rows: list[dict[str, str]] = []
    for task, metrics in tasks.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(
                f"eval_results[{task!r}] must map metric names to values (e.g. {{'accuracy': 0.5}}), "
                f"got {metrics!r}."
            )
        path, dataset_config, split = identity[task]
        if counts[identity[task]] > 1:
            path = task
        alias = metrics.get("alias")
        display = alias.strip() if isinstance(alias, str) and alias.strip() else task
        n_shot = n_shots.get(task, (configs.get(task) or {}).get("num_fewshot"))
        n_shot = _plain_scalar(n_shot)
        dataset_args = (
            {"num_few_shot": n_shot} if isinstance(n_shot, int) and not isinstance(n_shot, bool) else None
        )

        stderrs: dict[tuple[str, str], Any] = {}
        values: list[tuple[str, str, Any]] = []
        for key, value in metrics.items():
            if key in _LM_EVAL_NON_METRIC_KEYS:
                continue
            metric, _, filter_name = str(key).partition(",")
            if metric.endswith("_stderr"):
                stderrs[(metric[: -len("_stderr")], filter_name)] = _plain_scalar(value)
                continue
            values.append((metric, filter_name, _metric_value(value, f"eval_results[{task!r}][{key!r}]")))
        if not values:
            raise ValueError(f"eval_results[{task!r}] holds no metric value.")
        for metric, filter_name, value in values:
            metric_name = f"{metric} ({filter_name})" if filter_name and filter_name != "none" else None
            result = EvalResult(
                task_type=EVAL_TASK_TYPE,
                task_name="Text Generation",
                dataset_type=path,
                dataset_name=display,
                dataset_config=dataset_config,
                dataset_split=split,
                dataset_args=dataset_args,
                metric_type=metric,
                metric_name=metric_name,
                metric_value=value,
            )
            results.append(result)
            rows.append(_eval_row(result, stderrs.get((metric, filter_name))))
    return results, rows


__all__ = ["EVAL_TASK_TYPE", "parse_eval_results"]
