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
"""Loading SOURCE's weights into an `MHCForCausalLM` and measuring how exactly it reproduces SOURCE."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from transformers_mhc import MHCConfig, MHCForCausalLM
from transformers_mhc.data import load_text

from .plan import TOKENIZER_FILES, ConversionError, _supported_text

if TYPE_CHECKING:
    from .convert import ConversionReport

# Parameters a converted model has that no Llama-style checkpoint carries.
_NEW_PARAMETER_MARKERS = (".attn_hc.", ".mlp_hc.", "stream_readout.")
# Prompt of the greedy-continuation check.
DEFAULT_PROMPT = "Once upon a time"


def _load_converted(
    source_path: Path, config: MHCConfig, dtype: torch.dtype | None, seed: int, added_o_proj_bias: bool
) -> tuple[MHCForCausalLM, bool]:
    """Loads SOURCE's weights into an `MHCForCausalLM`, checking that exactly the new parameters are missing.

    Returns the model and whether zero `o_proj` biases were added (Qwen2).
    """
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)  # reproducible phi, without touching the caller's RNG
        try:
            model, info = MHCForCausalLM.from_pretrained(
                source_path,
                config=config,
                dtype=dtype or "auto",
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, with the names, instead of a bare RuntimeError
            )
        except (RuntimeError, ValueError, OSError, KeyError) as error:
            raise ConversionError(
                f"The weights in {source_path} do not fit a {config.num_hidden_layers}-layer Llama-style model "
                f"described by its config.json ({type(error).__name__}: {error})."
            ) from error

    # Qwen2 has q/k/v biases but no o_proj bias; Llama's `attention_bias` adds one, which we set to zero.
    added_o_bias = added_o_proj_bias and any(key.endswith("o_proj.bias") for key in info["missing_keys"])
    missing = sorted(
        key
        for key in info["missing_keys"]
        if not any(marker in key for marker in _NEW_PARAMETER_MARKERS)
        and not (added_o_bias and key.endswith("o_proj.bias"))
    )
    unexpected = sorted(key for key in info["unexpected_keys"] if not key.endswith("rotary_emb.inv_freq"))
    mismatched = sorted(_describe_mismatch(entry) for entry in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        problems = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                problems.append(f"{name}: {shown}")
        raise ConversionError(
            f"The state dict in {source_path} does not match its config.json ({'; '.join(problems)}). Supported "
            f"checkpoints: {_supported_text()}."
        )
    if added_o_bias:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias.zero_()
    model.eval()
    return model, added_o_bias


def _describe_mismatch(entry) -> str:
    if (
        isinstance(entry, tuple) and len(entry) == 3
    ):  # (name, shape in the checkpoint, shape the config implies)
        name, found, expected = entry
        return f"{name} is {tuple(found)} in the checkpoint, {tuple(expected)} by config.json"
    return str(entry)


def _count_new_parameters(model: MHCForCausalLM, added_o_bias: bool) -> int:
    """Parameters of the converted model that SOURCE does not have (hyper-connections, zero o_proj biases)."""
    new = sum(
        p.numel()
        for name, p in model.named_parameters()
        if any(m in f".{name}" for m in _NEW_PARAMETER_MARKERS)
    )
    if added_o_bias:
        new += sum(layer.self_attn.o_proj.bias.numel() for layer in model.model.layers)
    return new


def _check_finite(model: MHCForCausalLM, source_path: Path) -> None:
    """NaN or infinite weights copied from SOURCE would only surface later (in the exactness check, the card)."""
    with torch.no_grad():
        bad = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise ConversionError(
            f"SOURCE {source_path} has NaN or infinite weights ({shown}); the checkpoint is damaged: re-download or "
            f"re-save it."
        )


@torch.no_grad()
def _measure_exactness(
    report: ConversionReport, source_path: Path, converted_path: Path, prompt: str, num_greedy_tokens: int
) -> None:
    """Compares the saved converted model with SOURCE: logits on a fixed batch and a greedy continuation."""
    dtype = getattr(torch, report.dtype)
    with quiet_transformers():
        reference = AutoModelForCausalLM.from_pretrained(source_path, dtype=dtype).eval()
        converted = MHCForCausalLM.from_pretrained(converted_path, dtype=dtype).eval()
    tokenizer = _try_tokenizer(source_path)
    config = converted.config

    batch = fixed_batch(tokenizer, config.vocab_size, config.max_position_embeddings)
    diff = (converted(batch).logits.float() - reference(batch).logits.float()).abs().max()
    report.max_abs_logit_diff = float(diff)
    report.num_tokens = batch.numel()

    if tokenizer is not None:
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:  # no tokenizer: the first tokens of the fixed batch stand in for a prompt
        prompt_ids = batch[:1, :4]
        prompt = " ".join(str(int(token)) for token in prompt_ids[0])
    generation = GenerationConfig(
        do_sample=False,
        max_new_tokens=num_greedy_tokens,
        min_new_tokens=num_greedy_tokens,  # compare the full length even if EOS comes first
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id,
        bos_token_id=config.bos_token_id,
    )
    mask = torch.ones_like(prompt_ids)
    expected = reference.generate(prompt_ids, attention_mask=mask, generation_config=generation)
    actual = converted.generate(prompt_ids, attention_mask=mask, generation_config=generation)
    expected, actual = expected[0, prompt_ids.shape[1] :], actual[0, prompt_ids.shape[1] :]
    report.prompt = prompt
    report.greedy_tokens = int(actual.numel())
    report.greedy_agreement = float((expected == actual).float().mean()) if actual.numel() else 1.0
    report.greedy_identical = bool(torch.equal(expected, actual))
    report.continuation = (
        tokenizer.decode(actual, skip_special_tokens=True) if tokenizer is not None else str(actual.tolist())
    )


def fixed_batch(
    tokenizer, vocab_size: int, max_positions: int, batch_size: int = 2, length: int = 64
) -> torch.Tensor:
    """The batch the conversion compares logits on: the built-in text, or seeded random ids without a tokenizer."""
    length = min(length, max_positions)
    if tokenizer is not None:
        ids = tokenizer(load_text(), add_special_tokens=False).input_ids
        ids = [token for token in ids if token < vocab_size]
    else:
        ids = []
    if len(ids) < 8:
        ids = torch.randint(
            0, vocab_size, (batch_size * length,), generator=torch.Generator().manual_seed(0)
        ).tolist()
    repeats = math.ceil(batch_size * length / len(ids))
    return torch.tensor((ids * repeats)[: batch_size * length]).view(batch_size, length)


def _try_tokenizer(source_path: Path):
    if not any((source_path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source_path)
    except Exception:  # noqa: BLE001 - a broken tokenizer only means we measure on random ids
        return None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hides transformers' load reports and progress bars (missing hyper-connection weights are expected here)."""
    verbosity = hf_logging.get_verbosity()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
