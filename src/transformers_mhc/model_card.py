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
"""Model cards of transformers-mhc models, rendered from the templates of `transformers_mhc.model_cards`.

- `build_model_card` renders the MHC, decay linear-attention or converted-checkpoint template into a
  `huggingface_hub.ModelCard` with valid YAML metadata (`library_name`, tags, `base_model`, `model-index` from
  evaluation results, ...).
- `card_for_folder` does the same for a saved model folder, keeping what its README.md metadata records.
- `write_model_card` writes `README.md` atomically, with the file mode of any new file (umask applies).
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from .model_cards import template_path
from .model_index import _format_number, _plain_scalar, parse_eval_results

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("mhc", "decay_linear_attn")
"""`model_type`s `build_model_card` has a template for."""

_DEFAULT_ARCHITECTURES = {"mhc": "MHCForCausalLM", "decay_linear_attn": "DecayLinearAttnForCausalLM"}

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


_TOKEN_MIXER_TITLES = {
    "decay": "linear attention with decay",
    "h3": "H3: Q ⊙ SSM_diag(SSM_shift(K) ⊙ V), S4D diagonal SSM",
    "s4d": "S4D diagonal SSM alone, per channel",
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
    mixer = getattr(config, "token_mixer", None) or "decay"
    conv_targets = "k (H3's shift SSM)" if mixer == "h3" else "q, k and v (H3-style)"
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
        "short_conv_text": f"kernel {short_conv}, causal depthwise on {conv_targets}"
        if short_conv
        else "none",
        "token_mixer": mixer,
        "token_mixer_text": _TOKEN_MIXER_TITLES.get(mixer, mixer),
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

    An existing README.md is left untouched if anything fails before the final rename. The file gets the mode of
    any new file (0o666 less the umask, usually 0o644), not the 0o600 of `tempfile.mkstemp`.
    """
    folder = Path(folder)
    text = str(card)
    temporary = folder / f".{README_NAME}.{uuid.uuid4().hex}.tmp"
    # O_EXCL: never write through a file or link that is already there; 0o666 lets the umask decide the mode.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, folder / README_NAME)
    except BaseException:
        temporary.unlink(missing_ok=True)
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


__all__ = [
    "MODEL_ID_PLACEHOLDER",
    "README_NAME",
    "SUPPORTED_MODEL_TYPES",
    "build_model_card",
    "card_for_folder",
    "write_model_card",
]
