"""Retrofit pretrained Llama-style checkpoints (Llama, Mistral, Qwen2) with identity-initialised
hyper-connections: `convert_llama_to_mhc` and the `transformers-mhc convert` command."""

from .convert import (
    SUPPORTED_MODEL_TYPES,
    ConversionError,
    ConversionReport,
    convert_llama_to_mhc,
    fixed_batch,
    load_source_config,
    mhc_config_from_source,
    resolve_source,
)

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
