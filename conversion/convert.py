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
"""Retrofit a pretrained Llama-style checkpoint with identity-initialised hyper-connections.

Why the converted model computes the same function as the original: every stream starts as a copy of the
embedding; each sub-layer reads `Σ h_pre_j x_j` with `h_pre = 1/n`, i.e. the mean of the streams; `h_res` is doubly
stochastic (symmetric static logits, so Sinkhorn is exact at once) and `h_post` has mean 1, so the *mean* of the
streams follows the original residual `x + F(x)` exactly; the mean readout hands that mean to the final norm. The
dynamic (input-dependent) terms start at zero. This holds for any logit gap and any zero-mean `h_post` spread,
which is why the options that let `h_res` learn (a smaller gap, symmetry breaking) keep the conversion exact.

The weights are copied by name (MHC keeps Llama's parameter names), through `MHCForCausalLM.from_pretrained` with
a converted config: that reads sharded safetensors, keeps the dtype, ties embeddings, and initialises the missing
hyper-connection parameters with the model's own `_init_weights`.

This file holds the top-level flow; its steps live beside it: `plan.py` checks the arguments and SOURCE and
builds the converted config, `weights.py` loads the weights and measures the exactness, `write.py` checks and
writes OUTPUT.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch

from transformers_mhc import MHCConfig
from transformers_mhc.outputs import OutputError, OutputFolder

from .plan import (
    HUB_PATTERNS,
    ConversionError,
    _check_arguments,
    _parse_dtype,
    _parse_shard_size,
    check_weight_files,
    load_source_config,
    mhc_config_from_source,
    resolve_source,
)
from .weights import (
    DEFAULT_PROMPT,
    _check_finite,
    _count_new_parameters,
    _load_converted,
    _measure_exactness,
    quiet_transformers,
)
from .write import (
    _check_not_nested,
    _checked_output,
    _legacy_leftovers,
    _save_staged,
    _write_model_card,
    _write_report,
)


@dataclass
class ConversionReport:
    """What a conversion did and how exactly the converted model reproduces the original.

    The exactness fields are `None` when the conversion ran with `verify=False`.

    Attributes:
        source (`str`): SOURCE as given (local folder or Hub id).
        source_path (`str`): the local folder the weights were read from.
        output (`str`): the folder written.
        source_model_type (`str`): `model_type` of SOURCE (`"llama"`, `"mistral"` or `"qwen2"`).
        num_streams (`int`), hyper_connection (`str`), res_logit_gap (`float`), symmetry_breaking (`float`):
            the hyper-connection settings of the converted model.
        dtype (`str`): dtype of the converted weights (and of the exactness measurement).
        num_parameters_source (`int`), num_parameters_converted (`int`): parameter counts.
        max_abs_logit_diff (`float`): max |logits(converted) - logits(source)| over `num_tokens` tokens.
        num_tokens (`int`): tokens in the fixed batch the logits were compared on.
        prompt (`str`): the prompt of the greedy continuation (decoded text when SOURCE has no tokenizer).
        greedy_tokens (`int`): tokens generated greedily by both models.
        greedy_agreement (`float`): fraction of generated positions where both models chose the same token.
        greedy_identical (`bool`): whether the two continuations are identical.
        continuation (`str`): the converted model's continuation (decoded when a tokenizer is available).
        files (`list[str]`): files in OUTPUT.
        notes (`list[str]`): differences a user should know about (for example a sliding window dropped).
        seconds (`float`): wall time of the conversion.
    """

    source: str
    source_path: str
    output: str
    source_model_type: str
    num_streams: int
    hyper_connection: str
    res_logit_gap: float
    symmetry_breaking: float
    dtype: str
    num_parameters_source: int
    num_parameters_converted: int
    max_abs_logit_diff: float | None = None
    num_tokens: int | None = None
    prompt: str | None = None
    greedy_tokens: int | None = None
    greedy_agreement: float | None = None
    greedy_identical: bool | None = None
    continuation: str | None = None
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """The report as a JSON-serialisable dictionary."""
        return asdict(self)

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"converted {self.source} ({self.source_model_type}) -> {self.output}",
            f"  {self.hyper_connection} with {self.num_streams} streams, dtype {self.dtype}, "
            f"h_res logit gap {self.res_logit_gap}, symmetry breaking {self.symmetry_breaking}",
            f"  parameters: {self.num_parameters_source:,} -> {self.num_parameters_converted:,}",
        ]
        if self.max_abs_logit_diff is not None:
            lines.append(
                f"  max abs logit diff vs source: {self.max_abs_logit_diff:.3g} over {self.num_tokens} tokens"
            )
            lines.append(
                f"  greedy continuation of {self.prompt!r}: {self.greedy_agreement:.0%} of {self.greedy_tokens} "
                f"tokens agree ({'identical' if self.greedy_identical else 'DIFFERENT'})"
            )
        else:
            lines.append("  exactness not measured (verify=False)")
        lines.extend(f"  note: {note}" for note in self.notes)
        lines.append(f"  took {self.seconds:.1f} s")
        return "\n".join(lines)


def convert_llama_to_mhc(
    source: str | os.PathLike,
    output: str | os.PathLike,
    num_streams: int = 4,
    hyper_connection: str = "mhc",
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    res_logit_gap: float = MHCConfig.hc_res_logit_gap,
    symmetry_breaking: float = MHCConfig.hc_symmetry_breaking,
    max_shard_size: int | str = "5GB",
    verify: bool = True,
    prompt: str = DEFAULT_PROMPT,
    num_greedy_tokens: int = 40,
    seed: int = 0,
    revision: str | None = None,
) -> ConversionReport:
    """Converts a Llama, Mistral or Qwen2 causal LM into an `MHCForCausalLM` that reproduces it.

    Every argument, SOURCE's config and weight files and the writability of OUTPUT are checked before anything is
    written. The conversion then owns OUTPUT for the whole run (a lock file beside it: a second conversion into the
    same OUTPUT fails at once), writes the new checkpoint into `.<OUTPUT>.transformers-mhc/staging/` and moves it
    into place only when it is complete (weights, config with `auto_map`, remote code, tokenizer, generation config,
    model card and `mhc_conversion.json`); an old OUTPUT is replaced atomically where the OS allows it and is kept
    until the new one is in place (see `transformers_mhc.outputs`). SOURCE is only read.

    Args:
        source (`str` or `os.PathLike`):
            A local checkpoint folder, or a Hub repository id (downloaded with `huggingface_hub.snapshot_download`
            when no such folder exists).
        output (`str` or `os.PathLike`):
            Folder to create. If it exists, the conversion refuses to run unless `overwrite=True`; then it is
            replaced only after the new checkpoint is complete. A symlink to a folder is replaced at its target.
        num_streams (`int`, *optional*, defaults to 4):
            Residual streams `n` of the converted model.
        hyper_connection (`str`, *optional*, defaults to `"mhc"`):
            `"mhc"` (manifold-constrained) or `"hc"` (unconstrained dynamic hyper-connections).
        dtype (`str` or `torch.dtype`, *optional*):
            `"float32"`, `"bfloat16"` or `"float16"`; by default the dtype of SOURCE is kept.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace an existing `output` folder.
        res_logit_gap (`float`, *optional*, defaults to `MHCConfig.hc_res_logit_gap`):
            Diagonal minus off-diagonal static logit of `h_res` (`"mhc"` only). Smaller gaps (e.g. 1.0) let `h_res`
            learn to mix streams during fine-tuning; the conversion is exact for any gap.
        symmetry_breaking (`float`, *optional*, defaults to `MHCConfig.hc_symmetry_breaking`):
            Spreads `h_post` over `[1 - s, 1 + s]` (zero mean, `0 <= s < 1`) so that the copied streams can become
            different (e.g. 0.1); exact for any `s`.
        max_shard_size (`int` or `str`, *optional*, defaults to `"5GB"`):
            Largest safetensors shard written.
        verify (`bool`, *optional*, defaults to `True`):
            Measure the exactness (logits on a fixed batch, greedy continuation) against SOURCE; this loads SOURCE a
            second time.
        prompt (`str`, *optional*, defaults to `"Once upon a time"`):
            Prompt of the greedy-continuation check.
        num_greedy_tokens (`int`, *optional*, defaults to 40):
            Tokens generated by each model in the greedy check.
        seed (`int`, *optional*, defaults to 0):
            Seed of the hyper-connection initialisation (`phi`), so conversions are reproducible.
        revision (`str`, *optional*):
            Hub revision when `source` is a repository id.

    Returns:
        [`ConversionReport`]: settings, parameter counts and measured exactness.

    Raises:
        `ConversionError`: unsupported or malformed SOURCE (the message lists what is supported, or names the broken
            file), invalid arguments, an OUTPUT that cannot be written, an existing OUTPUT without `overwrite`, or an
            OUTPUT another conversion is writing.
    """
    start = time.perf_counter()
    target_dtype = _parse_dtype(dtype)
    _check_arguments(num_streams, hyper_connection, res_logit_gap, symmetry_breaking, num_greedy_tokens, seed)
    max_shard_size = _parse_shard_size(max_shard_size)
    output = _checked_output(output, overwrite)

    source_path = resolve_source(source, revision=revision)
    _check_not_nested(source_path, output)
    source_config = load_source_config(source_path)
    check_weight_files(source_path)
    mhc_config, notes = mhc_config_from_source(
        source_config,
        num_streams=num_streams,
        hyper_connection=hyper_connection,
        res_logit_gap=res_logit_gap,
        symmetry_breaking=symmetry_breaking,
    )

    try:
        with OutputFolder(output, overwrite=overwrite) as folder:  # owns OUTPUT until the end of the run
            notes.extend(folder.notes)
            notes.extend(_legacy_leftovers(folder.path))
            staging = folder.staging
            model, added_o_bias = _load_converted(
                source_path,
                mhc_config,
                target_dtype,
                seed,
                added_o_proj_bias=source_config.model_type == "qwen2",
            )
            _check_finite(model, source_path)
            num_parameters = model.num_parameters()
            report = ConversionReport(
                source=str(source),
                source_path=str(source_path),
                output=str(output),
                source_model_type=source_config.model_type,
                num_streams=num_streams,
                hyper_connection=hyper_connection,
                res_logit_gap=float(mhc_config.hc_res_logit_gap),
                symmetry_breaking=float(mhc_config.hc_symmetry_breaking),
                dtype=str(model.dtype).removeprefix("torch."),
                num_parameters_source=num_parameters - _count_new_parameters(model, added_o_bias),
                num_parameters_converted=num_parameters,
                notes=notes,
            )
            _save_staged(model, source_path, staging, max_shard_size)
            del model  # the exactness check loads two models of its own

            if verify:
                _measure_exactness(
                    report, source_path, staging, prompt=prompt, num_greedy_tokens=num_greedy_tokens
                )
            report.seconds = time.perf_counter() - start
            _write_model_card(report, staging)
            _write_report(report, staging)
            folder.commit()
    except OutputError as error:  # OUTPUT taken by another conversion, or appeared meanwhile
        raise ConversionError(str(error)) from error
    report.seconds = time.perf_counter() - start
    return report


# Besides the flow: `check_weight_files` and `quiet_transformers` for `transformers_mhc.quickstart`, `HUB_PATTERNS`
# for the tests.
__all__ = [
    "HUB_PATTERNS",
    "ConversionReport",
    "check_weight_files",
    "convert_llama_to_mhc",
    "quiet_transformers",
]
