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
"""Model cards and `push_to_hub` for transformers-mhc models.

- `build_model_card` renders one of the templates of `transformers_mhc.model_cards` (MHC, decay linear
  attention, or a converted checkpoint) into a `huggingface_hub.ModelCard` with valid YAML metadata
  (`library_name`, tags, `base_model`, `model-index` from evaluation results, ...).
- `save_for_hub` writes what a repository needs: weights, `config.json` with a complete `auto_map`, the
  model code (so `trust_remote_code=True` works without the package), the tokenizer and `README.md`.
- `push_to_hub` saves all of that into a temporary folder and uploads it with the standard
  `huggingface_hub` client (`HfApi.create_repo` + `HfApi.upload_folder`); the endpoint comes from
  `HF_ENDPOINT` and `HF_HUB_OFFLINE=1` makes it raise `OfflineModeIsEnabled` before anything is written.
- `transformers-mhc push PATH REPO_ID` and `transformers-mhc card PATH` expose both on the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from .model_cards import template_path

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("mhc", "decay_linear_attn")
"""`model_type`s `build_model_card` has a template for."""

_DEFAULT_ARCHITECTURES = {"mhc": "MHCForCausalLM", "decay_linear_attn": "DecayLinearAttnForCausalLM"}

EVAL_TASK_TYPE = "text-generation"
"""`task.type` of every `model-index` entry (all our models are causal language models)."""

README_NAME = "README.md"

MODEL_ID_PLACEHOLDER = "path/to/model"
"""Stands for the repository id in the loading snippet of a card rendered without `model_id`; `push_to_hub`
replaces it by the id it pushes to."""

# Keys of the `conversion` dict with a fixed meaning (see `build_model_card`); others become table rows.
_CONVERSION_REQUIRED = ("max_abs_logit_diff", "greedy_agreement")
_CONVERSION_OPTIONAL_TYPES: dict[str, type] = {
    "greedy_tokens": int,
    "num_tokens": int,
    "prompt": str,
    "dtype": str,
    "source_model_type": str,
    "base_model": str,
    "base_model_local": str,
}
# lm-eval result keys that are not metrics.
_LM_EVAL_NON_METRIC_KEYS = frozenset({"alias", "samples", "name", "sample_len", "sample_count"})
# `dataset_path` values of lm-eval tasks that read local files: they do not name a dataset.
_LOCAL_DATASET_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
_LICENSE_TEXT = {
    "apache-2.0": "Released under the Apache License 2.0 (`apache-2.0`).",
    "mit": "Released under the MIT License (`mit`).",
}
_HC_TITLES = {
    "mhc": "manifold-constrained hyper-connections (mHC)",
    "hc": "(unconstrained, dynamic) hyper-connections (HC)",
    "none": "a plain residual connection",
}
_HC_SUMMARIES = {
    "mhc": (
        "Around every attention and MLP sub-layer, `h_pre` reads the sub-layer input from the streams, "
        "`h_post` writes its output back to them and `h_res` mixes the streams on the skip path. `h_res` is "
        "projected onto the doubly stochastic matrices (Sinkhorn-Knopp), so the skip path stays a convex "
        "combination of streams at any depth: the signal neither explodes nor vanishes."
    ),
    "hc": (
        "Around every attention and MLP sub-layer, `h_pre` reads the sub-layer input from the streams, "
        "`h_post` writes its output back to them and an unconstrained `h_res` mixes the streams on the skip "
        "path."
    ),
    "none": 'With `hyper_connection="none"` every layer is a standard pre-norm residual block (Llama).',
}


# ------------------------------------------------------------------------------------------------
# Evaluation results
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# Model card
# ------------------------------------------------------------------------------------------------
def _is_hub_repo_id(name: str) -> bool:
    if os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _count_parameters(model_or_folder: PreTrainedModel | Path) -> int | None:
    if isinstance(model_or_folder, PreTrainedModel):
        return sum(p.numel() for p in model_or_folder.parameters())
    files = sorted(Path(model_or_folder).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def _format_count(count: int | None) -> str | None:
    if count is None:
        return None
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix} ({count:,})"
    return f"{count:,}"


def _resolve_config(
    model_or_config: PreTrainedModel | PreTrainedConfig | str | os.PathLike,
) -> tuple[PreTrainedConfig, str | None, int | None, str | None]:
    """Returns (config, architecture name if known, parameter count, folder name if loaded from disk)."""
    if isinstance(model_or_config, PreTrainedModel):
        return (
            model_or_config.config,
            type(model_or_config).__name__,
            _count_parameters(model_or_config),
            None,
        )
    if isinstance(model_or_config, PreTrainedConfig):
        architectures = getattr(model_or_config, "architectures", None) or [None]
        return model_or_config, architectures[0], None, None
    if isinstance(model_or_config, (str, os.PathLike)):
        folder = Path(model_or_config)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a saved model folder: it has no config.json.")
        config = AutoConfig.from_pretrained(folder)
        architectures = getattr(config, "architectures", None) or [None]
        return config, architectures[0], _count_parameters(folder), folder.resolve().name
    raise TypeError(
        "`model_or_config` must be a PreTrainedModel, a PreTrainedConfig or the path of a saved model folder, "
        f"got {type(model_or_config).__name__}."
    )


def _check_conversion(conversion: Mapping[str, Any]) -> dict[str, Any]:
    """Validates the measured conversion figures and returns them as plain Python values."""
    if not isinstance(conversion, Mapping):
        raise ValueError(f"`conversion` must be a dict of measured figures, got {type(conversion).__name__}.")
    missing = [key for key in _CONVERSION_REQUIRED if conversion.get(key) is None]
    if missing:
        raise ValueError(
            f"`conversion` is missing {missing}: a converted checkpoint's card reports the exactness measured at "
            "conversion time (`max_abs_logit_diff`: max |logit difference| vs the original; `greedy_agreement`: "
            "fraction in [0, 1] of identical greedy tokens, or a bool)."
        )
    checked: dict[str, Any] = {}
    for key, value in conversion.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"`conversion` keys must be non-empty strings, got {key!r}.")
        value = _plain_scalar(value)
        if value is None:
            continue
        if key == "max_abs_logit_diff":
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(
                    f"`conversion['max_abs_logit_diff']` must be a finite number >= 0, got {value!r}."
                )
            value = float(value)
        elif key == "greedy_agreement":
            if not isinstance(value, bool) and (not isinstance(value, (int, float)) or not 0 <= value <= 1):
                raise ValueError(
                    f"`conversion['greedy_agreement']` must be a fraction in [0, 1] or a bool, got {value!r}."
                )
            value = value if isinstance(value, bool) else float(value)
        elif key in _CONVERSION_OPTIONAL_TYPES:
            expected = _CONVERSION_OPTIONAL_TYPES[key]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ValueError(f"`conversion[{key!r}]` must be of type {expected.__name__}, got {value!r}.")
        elif not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"`conversion[{key!r}]` must be a number, a bool or a string, got {value!r}.")
        checked[key] = value
    return checked


def _conversion_context(conversion: dict[str, Any]) -> dict[str, Any]:
    greedy = conversion["greedy_agreement"]
    if isinstance(greedy, bool):
        greedy_text = "identical continuation" if greedy else "different continuation"
    elif greedy == 1.0:
        greedy_text = "100% (identical continuation)"
    else:
        greedy_text = f"{100 * greedy:.1f}% of tokens identical"
    known = set(_CONVERSION_REQUIRED) | set(_CONVERSION_OPTIONAL_TYPES)
    extra_rows = [
        {"name": key.replace("_", " ").capitalize(), "value": _format_number(value)}
        for key, value in conversion.items()
        if key not in known
    ]
    return {
        "conversion": conversion,
        "max_abs_logit_diff_text": f"{conversion['max_abs_logit_diff']:.3g}",
        "greedy_agreement_text": greedy_text,
        "conversion_extra_rows": extra_rows,
    }


def _decay_context(config: PreTrainedConfig) -> dict[str, Any]:
    fields = (
        "decay_type",
        "decay_granularity",
        "share_decay_with_key",
        "positional_encoding",
        "short_conv_size",
        "attention_layers",
    )
    decay = {field: getattr(config, field, None) for field in fields}
    short_conv = decay["short_conv_size"] or 0
    layers = decay["attention_layers"] or []
    hyper_connection = getattr(config, "hyper_connection", None) or "none"
    num_streams = getattr(config, "num_streams", 1)
    return {
        "use_delta_rule": bool(getattr(config, "use_delta_rule", False)),
        "decay_hyper_connection": hyper_connection,
        "residual_text": (
            f'`hyper_connection="{hyper_connection}"`: {_HC_TITLES.get(hyper_connection, hyper_connection)}'
            + (f" over {num_streams} streams" if hyper_connection != "none" else "")
        ),
        "decay": {key: ("n/a" if value is None else value) for key, value in decay.items()},
        "short_conv": short_conv,
        "short_conv_text": (
            f"kernel {short_conv}, causal depthwise on q, k and v (H3-style)" if short_conv else "none"
        ),
        "attention_layers_text": (
            ", ".join(str(layer) for layer in layers) + " (hybrid; the other layers use linear attention)"
            if layers
            else "none (every layer is linear attention)"
        ),
    }


def _tags(config: PreTrainedConfig, converted: bool, source_model_type: str | None) -> list[str]:
    tags = ["transformers-mhc"]
    if config.model_type == "mhc":
        tags.append("mhc")
        if getattr(config, "hyper_connection", "mhc") != "none":
            tags.append("hyper-connections")
    else:
        tags += ["decay-linear-attention", "linear-attention"]
        if getattr(config, "short_conv_size", None):
            tags.append("short-convolution")
        if getattr(config, "attention_layers", None):
            tags.append("hybrid-attention")
        if (getattr(config, "hyper_connection", None) or "none") != "none":
            tags.append("hyper-connections")
    if converted:
        tags.append("converted")
        if source_model_type:
            tags.append(source_model_type)
    tags.append("custom_code")
    return tags


def build_model_card(
    model_or_config: PreTrainedModel | PreTrainedConfig | str | os.PathLike,
    *,
    model_id: str | None = None,
    base_model: str | None = None,
    conversion: Mapping[str, Any] | None = None,
    eval_results: Mapping[str, Any] | Iterable[EvalResult] | None = None,
    license: str = "apache-2.0",
    datasets: str | Iterable[str] | None = None,
    extra_notes: str | None = None,
) -> ModelCard:
    """Renders the model card of an MHC, decay linear-attention or converted checkpoint.

    Args:
        model_or_config: the model, its config, or the path of a saved model folder (its config is read and
            its parameters counted from the safetensors headers, without loading the weights).
        model_id: the Hub repository id (`namespace/name`); used for the title, the loading snippet and the
            `model-index` name.
        base_model: the checkpoint this one derives from. A Hub id goes into the `base_model` metadata; a local
            path (not a valid Hub id, or an existing folder) is only named in the text.
        conversion: figures measured when the checkpoint was converted; selects the "converted" template.
            Required: `max_abs_logit_diff` (max |logit difference| vs the original) and `greedy_agreement`
            (fraction in [0, 1] of identical greedy tokens, or a bool). Optional: `greedy_tokens`, `num_tokens`
            (tokens in the logit comparison), `prompt`, `dtype`, `source_model_type` (e.g. `"llama"`),
            `base_model` / `base_model_local` (used when the `base_model` argument is None); any other scalar is
            listed as an extra measurement. Stored under the `mhc_conversion` metadata key, with the base model
            (a Hub id, or only the folder name of a local path), so the card can be re-rendered
            (`transformers-mhc card`).
        eval_results: evaluation results, written as `model-index` metadata and a table (see
            `parse_eval_results` for the accepted forms).
        license: license id of the weights (Hub license identifier).
        datasets: training / fine-tuning dataset ids.
        extra_notes: Markdown appended as a "Notes" section.

    Returns:
        A `huggingface_hub.ModelCard` whose metadata parses back (`card.data.to_dict()`, `ModelCard.load`).

    Raises:
        ValueError: unsupported `model_type`, malformed `conversion` / `eval_results` or other bad arguments.
    """
    config, architecture, num_parameters, folder_name = _resolve_config(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"No model card template for model_type {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}."
        )
    if model_id is not None:
        validate_repo_id(model_id)
    if not isinstance(license, str) or not re.fullmatch(r"[a-z0-9][a-z0-9.+\-]*", license):
        raise ValueError(
            f"`license` must be a Hub license id such as 'apache-2.0' or 'mit', got {license!r}."
        )
    if isinstance(datasets, str):
        datasets = [datasets]
    dataset_list = list(datasets) if datasets is not None else []
    if not all(isinstance(name, str) and name for name in dataset_list):
        raise ValueError(f"`datasets` must be dataset ids (non-empty strings), got {dataset_list!r}.")
    if extra_notes is not None and not isinstance(extra_notes, str):
        raise ValueError(f"`extra_notes` must be a string of Markdown, got {type(extra_notes).__name__}.")

    checked_conversion: dict[str, Any] | None = None
    if conversion is not None:
        if model_type != "mhc":
            raise ValueError(
                f"`conversion` describes a checkpoint converted to hyper-connections (model_type 'mhc'), "
                f"but this model's model_type is {model_type!r}."
            )
        checked_conversion = _check_conversion(conversion)
        recorded_hub_base = checked_conversion.pop("base_model", None)
        recorded_local_base = checked_conversion.pop("base_model_local", None)
        if base_model is None:
            base_model = recorded_hub_base
        if base_model is None and recorded_local_base is None:
            raise ValueError(
                "A converted checkpoint's card needs `base_model` (the checkpoint it was converted from)."
            )
    if base_model is not None and (not isinstance(base_model, str) or not base_model.strip()):
        raise ValueError(f"`base_model` must be a Hub id or a local path, got {base_model!r}.")

    hub_base_model = base_model if base_model is not None and _is_hub_repo_id(base_model) else None
    local_base_model = None
    if base_model is not None and hub_base_model is None:
        # Only the folder name: a card is public, the path of the machine it was written on is not.
        local_base_model = Path(base_model.rstrip("/\\")).name or base_model
    elif base_model is None and checked_conversion is not None:
        local_base_model = recorded_local_base
    if checked_conversion is not None:
        # Recorded so that `card_for_folder` can re-render the card without the original arguments.
        if hub_base_model is not None:
            checked_conversion["base_model"] = hub_base_model
        else:
            checked_conversion["base_model_local"] = local_base_model

    model_name = model_id.split("/")[-1] if model_id else (folder_name or f"{model_type}-model")
    results, eval_rows = parse_eval_results(eval_results) if eval_results is not None else ([], [])
    metrics = list(dict.fromkeys(result.metric_type for result in results))
    source_model_type = checked_conversion.get("source_model_type") if checked_conversion else None

    extra_metadata: dict[str, Any] = {}
    if checked_conversion is not None:
        extra_metadata["mhc_conversion"] = checked_conversion
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=_tags(config, checked_conversion is not None, source_model_type),
        base_model=hub_base_model,
        datasets=dataset_list or None,
        metrics=metrics or None,
        eval_results=results or None,
        model_name=(model_id or model_name) if results else None,  # the model-index name
        **extra_metadata,
    )

    context: dict[str, Any] = {
        "model_name": model_name,
        "model_id": model_id or MODEL_ID_PLACEHOLDER,
        "architecture": architecture or _DEFAULT_ARCHITECTURES[model_type],
        "config": config.to_dict(),
        "num_parameters": _format_count(num_parameters),
        "base_model": hub_base_model,
        "base_model_url": f"https://huggingface.co/{hub_base_model}" if hub_base_model else None,
        "base_model_local": local_base_model,
        "datasets": dataset_list,
        "eval_rows": eval_rows,
        "extra_notes": extra_notes.strip() if extra_notes else None,
        "license_text": _LICENSE_TEXT.get(license, f"License: `{license}`."),
    }
    if model_type == "mhc":
        hyper_connection = getattr(config, "hyper_connection", "mhc")
        context["hc_title"] = _HC_TITLES.get(hyper_connection, f"`{hyper_connection}` connections")
        context["hc_summary"] = _HC_SUMMARIES.get(hyper_connection, "")
    else:
        context.update(_decay_context(config))
    if checked_conversion is not None:
        context.update(_conversion_context(checked_conversion))
        template = "converted"
    else:
        template = model_type
    return ModelCard.from_template(card_data, template_path=str(template_path(template)), **context)


def write_model_card(folder: str | os.PathLike, card: ModelCard) -> Path:
    """Writes `card` to `folder/README.md` atomically: a temporary file in `folder` replaced into place.

    An existing README.md is left untouched if anything fails before the final rename.
    """
    folder = Path(folder)
    text = str(card)
    descriptor, temporary = tempfile.mkstemp(prefix=".README.md.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, folder / README_NAME)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return folder / README_NAME


def card_for_folder(
    folder: str | os.PathLike,
    *,
    model_id: str | None = None,
    base_model: str | None = None,
    conversion: Mapping[str, Any] | None = None,
    eval_results: Mapping[str, Any] | Iterable[EvalResult] | None = None,
    license: str | None = None,
    datasets: Iterable[str] | None = None,
    extra_notes: str | None = None,
    fresh: bool = False,
) -> ModelCard:
    """Builds the card of a saved model folder, keeping what its current README.md metadata records.

    Unless `fresh`, the `base_model`, `license`, `datasets`, `model-index` (evaluation results) and
    `mhc_conversion` (conversion figures) of an existing README.md are reused where no argument overrides them.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a saved model folder: it has no config.json.")
    readme = folder / README_NAME
    if readme.is_file() and not fresh:
        try:
            existing = ModelCard.load(readme).data
        except (ValueError, yaml.YAMLError) as error:
            raise ValueError(
                f"The metadata of {readme} cannot be parsed ({error}); fix it or pass --fresh to ignore it."
            ) from error
        previous_conversion = existing.get("mhc_conversion")
        previous_base = existing.get("base_model")
        if isinstance(previous_base, list):
            previous_base = previous_base[0] if len(previous_base) == 1 else None
        if conversion is None and isinstance(previous_conversion, Mapping):
            conversion = previous_conversion
        if base_model is None:
            base_model = previous_base  # a converted card's `mhc_conversion` also records it
        if license is None:
            license = existing.get("license")
        if datasets is None:
            previous_datasets = existing.get("datasets")
            datasets = [previous_datasets] if isinstance(previous_datasets, str) else previous_datasets
        if eval_results is None and existing.get("eval_results"):
            eval_results = existing.get("eval_results")
    return build_model_card(
        folder,
        model_id=model_id,
        base_model=base_model,
        conversion=conversion,
        eval_results=eval_results,
        license=license or "apache-2.0",
        datasets=datasets,
        extra_notes=extra_notes,
    )


# ------------------------------------------------------------------------------------------------
# Saving and uploading
# ------------------------------------------------------------------------------------------------
def complete_auto_map(folder: str | os.PathLike, model: PreTrainedModel) -> None:
    """Adds the other registered classes of the model's code file to `auto_map` in `folder/config.json`.

    `save_pretrained` only maps the saved class (e.g. `AutoModelForCausalLM`); the base model class registered
    with `register_for_auto_class("AutoModel")` lives in the same copied file, so map it too.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    data = json.loads(config_file.read_text(encoding="utf-8"))
    auto_map = data.get("auto_map")
    if not isinstance(auto_map, dict):
        return  # not a remote-code model
    module_name = type(model).__module__
    module = sys.modules.get(module_name)
    stem = module_name.rsplit(".", 1)[-1]
    if module is None or not (folder / f"{stem}.py").is_file():
        return
    changed = False
    for obj in vars(module).values():
        if (
            isinstance(obj, type)
            and issubclass(obj, PreTrainedModel)
            and obj.__module__ == module_name
            and isinstance(vars(obj).get("_auto_class"), str)
            and getattr(obj, "config_class", None) is type(model.config)
            and obj._auto_class not in auto_map
        ):
            auto_map[obj._auto_class] = f"{stem}.{obj.__name__}"
            changed = True
    if changed:
        data["auto_map"] = dict(sorted(auto_map.items()))
        temporary = config_file.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temporary, config_file)


_complete_auto_map = complete_auto_map  # earlier name, imported by `transformers_mhc.conversion`


def save_for_hub(
    model: PreTrainedModel,
    folder: str | os.PathLike,
    *,
    tokenizer: Any | None = None,
    card: ModelCard | None = None,
) -> Path:
    """Writes everything a Hub repository of `model` holds into `folder`.

    That is: the weights (safetensors), `config.json` whose `auto_map` covers every registered class of the
    model's code (`AutoConfig`, `AutoModel`, `AutoModelForCausalLM`), the code files themselves
    (`configuration_*.py`, `modeling_*.py` and their helpers, copied by `save_pretrained`), the generation
    config, the tokenizer if given and `README.md` if a card is given.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"Expected a transformers PreTrainedModel, got {type(model).__name__} (merge PEFT adapters with "
            "`merge_and_unload()` first)."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    complete_auto_map(folder, model)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if card is not None:
        write_model_card(folder, card)
    return folder


def push_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    *,
    tokenizer: Any | None = None,
    card: ModelCard | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload model with transformers-mhc",
) -> CommitInfo:
    """Uploads `model` (weights, config with `auto_map`, remote code), its tokenizer and card to the Hub.

    Everything is written by `save_for_hub` into a temporary folder, then the repository is created if needed
    (`HfApi.create_repo(exist_ok=True)`) and the folder uploaded in one commit (`HfApi.upload_folder`). The
    endpoint is `HF_ENDPOINT` (read when `huggingface_hub` is imported); the token is `token`, else `HF_TOKEN`
    or the stored login. Without `card`, one is built with `build_model_card(model, model_id=repo_id)`; a card
    rendered without `model_id` gets `repo_id` filled into its loading snippet.

    Returns:
        The `huggingface_hub.CommitInfo` of the upload commit.

    Raises:
        OfflineModeIsEnabled: `HF_HUB_OFFLINE=1` is set; nothing is written or sent.
        huggingface_hub.errors.HFValidationError: `repo_id` is not a valid repository id.
        huggingface_hub.errors.HfHubHTTPError: the Hub refused a request (authentication, invalid metadata, ...).
    """
    if constants.is_offline_mode():
        raise OfflineModeIsEnabled(
            f"Cannot push to '{repo_id}': offline mode is enabled (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE to "
            "upload, or keep the model local with `transformers_mhc.hub.save_for_hub` / `save_pretrained`."
        )
    validate_repo_id(repo_id)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"Expected a transformers PreTrainedModel, got {type(model).__name__} (merge PEFT adapters with "
            "`merge_and_unload()` first)."
        )
    if card is None:
        card = build_model_card(model, model_id=repo_id)
    elif f'"{MODEL_ID_PLACEHOLDER}"' in card.text:
        card = ModelCard(str(card))  # a copy: the caller's card is left as it is
        card.text = card.text.replace(f'"{MODEL_ID_PLACEHOLDER}"', f'"{repo_id}"')
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="transformers-mhc-push-") as folder:
        save_for_hub(model, folder, tokenizer=tokenizer, card=card)
        return api.upload_folder(
            folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message
        )


# ------------------------------------------------------------------------------------------------
# Command line: `transformers-mhc push` and `transformers-mhc card`
# ------------------------------------------------------------------------------------------------
def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"Cannot read {what} file {path}: {error.strerror or error}.") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{what.capitalize()} file {path} is not valid JSON: {error}.") from error


def _has_tokenizer(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any((folder / name).is_file() for name in names)


def _run_card(args: argparse.Namespace) -> int:
    try:
        card = card_for_folder(
            args.path,
            model_id=args.model_id,
            base_model=args.base_model,
            conversion=_read_json(args.conversion, "conversion") if args.conversion else None,
            eval_results=_read_json(args.eval_results, "evaluation results") if args.eval_results else None,
            license=args.license,
            datasets=args.dataset,
            extra_notes=args.notes,
            fresh=args.fresh,
        )
        path = write_model_card(args.path, card)
    except (ValueError, TypeError, OSError, HFValidationError) as error:
        print(f"transformers-mhc card: error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {path}")
    return 0


def _run_push(args: argparse.Namespace) -> int:
    folder = Path(args.path)
    try:
        if constants.is_offline_mode():
            raise OfflineModeIsEnabled(
                f"Cannot push to '{args.repo_id}': offline mode is enabled (HF_HUB_OFFLINE=1); unset it to upload."
            )
        validate_repo_id(args.repo_id)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a saved model folder: it has no config.json.")
        readme = folder / README_NAME
        if args.eval_results or not readme.is_file():
            eval_results = _read_json(args.eval_results, "evaluation results") if args.eval_results else None
            card = card_for_folder(folder, model_id=args.repo_id, eval_results=eval_results)
        else:
            card = ModelCard.load(readme)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
        info = push_to_hub(
            model,
            args.repo_id,
            tokenizer=tokenizer,
            card=card,
            private=args.private,
            token=args.token,
            commit_message=args.commit_message,
        )
    except OfflineModeIsEnabled as error:
        print(f"transformers-mhc push: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, HFValidationError) as error:
        # HfHubHTTPError is an OSError: authentication, missing permissions, invalid metadata, ...
        print(f"transformers-mhc push: error: {error}", file=sys.stderr)
        return 1
    print(f"Pushed {folder} to {args.repo_id}: {info.commit_url}")
    return 0


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `transformers-mhc push` and `transformers-mhc card`."""
    push = subparsers.add_parser(
        "push",
        help="upload a saved model (weights, config, remote code, tokenizer, card) to the Hub",
        description=(
            "Upload the model saved in PATH to the Hub repository REPO_ID (created if needed): weights, config.json "
            "with auto_map, the model code for trust_remote_code, the tokenizer and README.md. The card is PATH's "
            "README.md, or is (re)built when there is none or --eval-results is given. Honours HF_ENDPOINT, "
            "HF_TOKEN and HF_HUB_OFFLINE."
        ),
    )
    push.add_argument("path", help="folder written by save_pretrained / transformers-mhc convert")
    push.add_argument("repo_id", help="Hub repository id, e.g. my-name/my-mhc-model")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument(
        "--eval-results",
        metavar="JSON",
        help="evaluation results ({task: {metric: value}} or lm-eval output) added to the card as model-index",
    )
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    push.add_argument("--commit-message", default="Upload model with transformers-mhc")
    push.set_defaults(func=_run_push)

    card = subparsers.add_parser(
        "card",
        help="(re)write the README.md model card of a saved model folder",
        description=(
            "Render the model card of the model saved in PATH and replace PATH/README.md atomically (the old file "
            "stays untouched if anything fails). Metadata of an existing card (base model, license, datasets, "
            "evaluation results, conversion figures) is kept unless overridden or --fresh is given."
        ),
    )
    card.add_argument("path", help="folder written by save_pretrained / transformers-mhc convert")
    card.add_argument("--model-id", default=None, help="Hub repository id shown in the card")
    card.add_argument(
        "--base-model", default=None, help="checkpoint this model derives from (Hub id or path)"
    )
    card.add_argument("--conversion", metavar="JSON", help="conversion figures (max_abs_logit_diff, ...)")
    card.add_argument("--eval-results", metavar="JSON", help="evaluation results, as for `push`")
    card.add_argument("--license", default=None, help="license id (default: kept, else apache-2.0)")
    card.add_argument("--dataset", action="append", default=None, help="training dataset id (repeatable)")
    card.add_argument("--notes", default=None, help="Markdown added as a Notes section")
    card.add_argument("--fresh", action="store_true", help="ignore the metadata of an existing README.md")
    card.set_defaults(func=_run_card)


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "add_subparser",
    "build_model_card",
    "card_for_folder",
    "complete_auto_map",
    "parse_eval_results",
    "push_to_hub",
    "save_for_hub",
    "write_model_card",
]
