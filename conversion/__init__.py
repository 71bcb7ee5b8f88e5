"""Retrofit pretrained Llama-style checkpoints (Llama, Mistral, Qwen2) with identity-initialised
hyper-connections: `convert_llama_to_mhc` and the `transformers-mhc convert` command."""

from .convert import ConversionReport, convert_llama_to_mhc
from .plan import (
    SUPPORTED_MODEL_TYPES,
    ConversionError,
    load_source_config,
    mhc_config_from_source,
    resolve_source,
)
from .weights import fixed_batch

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ConversionError",
    "ConversionReport",
    "convert_llama_to_mhc",
    "fixed_batch",
    "load_source_config",
    "mhc_config_from_source",
    "resolve_source",
]
