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
"""What a conversion checks before it writes anything: the arguments, SOURCE (a local folder or a Hub snapshot),
its config and weight files, and the `MHCConfig` of the converted model."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedConfig
from transformers.utils.hub import convert_file_size_to_int

from transformers_mhc import MHCConfig
from transformers_mhc.models.configuration_mhc import MAX_LOGIT, MAX_STREAMS

# model_type -> what a supported checkpoint is: all three are Llama blocks under the same weight names.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM (sliding-window attention becomes full attention)",
    "qwen2": "Qwen2ForCausalLM (q/k/v biases kept; o_proj gets a zero bias)",
}
HYPER_CONNECTIONS = ("mhc", "hc")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# Files a tokenizer may need.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Only what a conversion reads is fetched from the Hub.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "vocab.txt", "*.jinja"]
# Config fields that describe the checkpoint file, not the architecture: never carried over.
_NOT_CARRIED_OVER = {"architectures", "model_type", "transformers_version", "auto_map"}


class ConversionError(ValueError):
    """A checkpoint cannot be converted, or the conversion arguments are invalid (the message says why)."""


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`None` keeps SOURCE's dtype; otherwise one of `DTYPES` (a name or the `torch.dtype`)."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConversionError(f"dtype must be one of {sorted(DTYPES)} (or None to keep SOURCE's), got {dtype!r}.")


def _check_arguments(
    num_streams: int,
    hyper_connection: str,
    res_logit_gap: float,
    symmetry_breaking: float,
    num_greedy_tokens: int,
    seed: int,
) -> None:
    if hyper_connection not in HYPER_CONNECTIONS:
        raise ConversionError(
            f"hyper_connection must be one of {list(HYPER_CONNECTIONS)}, got {hyper_connection!r} (a plain residual "
            f"needs no conversion)."
        )
    # The same bounds as the config fields these become (`num_streams`, `hc_res_logit_gap`).
    if isinstance(num_streams, bool) or not isinstance(num_streams, int) or num_streams < 1:
        raise ConversionError(f"num_streams must be an integer >= 1, got {num_streams!r}.")
    if num_streams > MAX_STREAMS:
        raise ConversionError(f"num_streams must be an integer <= {MAX_STREAMS}, got {num_streams!r}.")
    if not _is_number(res_logit_gap) or res_logit_gap < 0:
        raise ConversionError(f"res_logit_gap must be a finite number >= 0, got {res_logit_gap!r}.")
    if res_logit_gap > MAX_LOGIT:
        raise ConversionError(
            f"res_logit_gap must be <= {MAX_LOGIT:g} (h_res is the identity long before), got {res_logit_gap!r}."
        )
    if not _is_number(symmetry_breaking) or not 0 <= symmetry_breaking < 1:
        raise ConversionError(f"symmetry_breaking must be a number in [0, 1), got {symmetry_breaking!r}.")
    if isinstance(num_greedy_tokens, bool) or not isinstance(num_greedy_tokens, int) or num_greedy_tokens < 1:
        raise ConversionError(f"num_greedy_tokens must be an integer >= 1, got {num_greedy_tokens!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConversionError(f"seed must be an integer in [0, 2**63), got {seed!r}.")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_shard_size(max_shard_size: int | str) -> int:
    """`"5GB"`, `"500MB"`, `"2GiB"` or a byte count, checked before any weight is loaded."""
    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError, AttributeError):
        size = None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConversionError(
            f"max_shard_size must be a positive size such as '5GB', '500MB', '2GiB' or a number of bytes, got "
            f"{max_shard_size!r}."
        )
    return size


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> Path:
    """Returns the local folder of SOURCE: the folder itself, or a Hub snapshot for a repository id.

    Raises `ConversionError` when SOURCE is neither an existing folder nor a Hub repository that can be fetched.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path.absolute()
    if path.exists():
        raise ConversionError(
            f"SOURCE {source} is a file; expected a checkpoint folder or a Hub repository id."
        )
    text = str(source)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise ConversionError(f"SOURCE folder {source} does not exist.")
    from huggingface_hub import snapshot_download  # only needed for Hub ids

    try:
        return Path(snapshot_download(repo_id=text, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # noqa: BLE001 - any failure means "cannot get SOURCE"; say why
        raise ConversionError(
            f"SOURCE {source!r} is not a local folder and could not be fetched from the Hub "
            f"({type(error).__name__}: {error})."
        ) from error


def load_source_config(source_path: Path) -> PreTrainedConfig:
    """Reads and checks SOURCE's `config.json`; raises `ConversionError` listing the supported model types."""
    supported = _supported_text()
    config_file = source_path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"SOURCE {source_path} has no config.json. Supported checkpoints: {supported}.")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as error:
        raise ConversionError(f"{config_file} is not valid JSON ({error}).") from error
    if model_type == "mhc":
        raise ConversionError(f"SOURCE {source_path} is already an MHC checkpoint (model_type='mhc').")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"SOURCE {source_path} has model_type={model_type!r}, which cannot be converted. Supported checkpoints: "
            f"{supported}."
        )
    if not any((source_path / name).is_file() for name in WEIGHT_FILES):
        raise ConversionError(f"SOURCE {source_path} has no weights; expected one of {list(WEIGHT_FILES)}.")
    return AutoConfig.from_pretrained(source_path)


def check_weight_files(source_path: Path) -> None:
    """Checks that every safetensors file of SOURCE is complete (header and data), and that a sharded checkpoint's
    index names files that exist, before anything is loaded. Raises `ConversionError` naming the broken file."""
    index_file = source_path / "model.safetensors.index.json"
    files = sorted(source_path.glob("*.safetensors"))
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ConversionError(
                f"{index_file} is not a valid safetensors index ({type(error).__name__}: {error}); re-download or "
                f"re-save SOURCE."
            ) from error
        missing = [name for name in shards if not (source_path / name).is_file()]
        if missing:
            raise ConversionError(
                f"{index_file} lists shards that are missing from {source_path}: {', '.join(missing)}; re-download or "
                f"re-save SOURCE."
            )
    for file in files:
        size = file.stat().st_size
        try:
            with open(file, "rb") as handle:
                (header_size,) = struct.unpack("<Q", handle.read(8))
                if header_size > size - 8:
                    raise ValueError(f"its header claims {header_size} bytes")
                header = json.loads(handle.read(header_size))
            end = max(
                (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                default=0,
            )
        except (struct.error, ValueError, KeyError, TypeError, IndexError) as error:
            raise ConversionError(
                f"SOURCE weight file {file} is not a valid safetensors file ({error}); re-download or re-save "
                f"SOURCE."
            ) from error
        if 8 + header_size + end > size:
            raise ConversionError(
                f"SOURCE weight file {file} is truncated: {size} bytes, its header needs {8 + header_size + end}; "
                f"re-download or re-save SOURCE."
            )


def mhc_config_from_source(
    source_config: PreTrainedConfig,
    num_streams: int = 4,
    hyper_connection: str = "mhc",
    res_logit_gap: float = MHCConfig.hc_res_logit_gap,
    symmetry_breaking: float = MHCConfig.hc_symmetry_breaking,
) -> tuple[MHCConfig, list[str]]:
    """The `MHCConfig` of the converted model, and notes on what differs from SOURCE.

    Carries every Llama field over, and sets the hyper-connection fields to the identity initialisation: dynamic
    terms zero at the start, a mean readout, and `h_pre = 1/n`.
    """
    model_type = source_config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"model_type={model_type!r} cannot be converted. Supported: {_supported_text()}."
        )
    values = source_config.to_dict()
    llama_fields = set(MHCConfig.__dataclass_fields__) - _NOT_CARRIED_OVER
    kwargs = {
        key: value
        for key, value in values.items()
        if key in llama_fields and not key.startswith(("hc_", "_"))
    }
    notes: list[str] = []
    if model_type == "qwen2":
        # Llama's `attention_bias` also adds an o_proj bias; the converter sets it to zero.
        kwargs["attention_bias"] = True
    window = _sliding_window(source_config)
    if window is not None:
        notes.append(
            f"{model_type} uses sliding-window attention over {window} tokens; the converted model attends to the "
            f"full causal context, so outputs are identical for sequences of up to {window} tokens and differ beyond."
        )
    if hyper_connection == "mhc":
        # alpha = 0 makes the dynamic terms exactly zero; phi keeps its random init so alpha gets a gradient.
        kwargs.update(hc_gate_init=0.0, hc_res_logit_gap=float(res_logit_gap))
    else:
        # HC initialises phi to zero, so the dynamic terms are zero while alpha keeps its default (a zero alpha
        # *and* a zero phi would get no gradient). Reading the uniform mean (h_pre = 1/n, used without sigmoid in HC)
        # keeps the model exact when symmetry breaking makes the streams differ.
        kwargs["hc_pre_bias_init"] = 1.0 / num_streams
    config = MHCConfig(
        **kwargs,
        num_streams=num_streams,
        hyper_connection=hyper_connection,
        hc_readout="mean",
        hc_symmetry_breaking=float(symmetry_breaking),
    )
    return config, notes


def _sliding_window(config: PreTrainedConfig) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None  # Qwen2 with use_sliding_window=False: every layer is full attention
    return int(window)


def _supported_text() -> str:
    return "; ".join(
        f"{model_type} ({description})" for model_type, description in SUPPORTED_MODEL_TYPES.items()
    )
