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

Why the converted model computes the same function as the original (reference `mhc.md` §4): every stream
starts as a copy of the embedding; each sub-layer reads `Σ h_pre_j x_j` with `h_pre = 1/n`, i.e. the mean of the
streams; `h_res` is doubly stochastic (symmetric static logits, so Sinkhorn is exact at once) and `h_post` has
mean 1, so the *mean* of the streams follows the original residual `x + F(x)` exactly; the mean readout hands
that mean to the final norm. The dynamic (input-dependent) terms start at zero. This holds for any logit gap and
any zero-mean `h_post` spread, which is why the options that let `h_res` learn (a smaller gap, symmetry breaking)
keep the conversion exact.

The weights are copied by name (MHC keeps Llama's parameter names), through `MHCForCausalLM.from_pretrained` with
a converted config: that reads sharded safetensors, keeps the dtype, ties embeddings, and initialises the missing
hyper-connection parameters with the model's own `_init_weights`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedConfig
from transformers.utils import logging as hf_logging
from transformers.utils.hub import convert_file_size_to_int

from transformers_mhc import MHCConfig, MHCForCausalLM
from transformers_mhc.data import load_text
from transformers_mhc.hub import build_model_card, complete_auto_map, write_model_card
from transformers_mhc.models.configuration_mhc import MAX_LOGIT, MAX_STREAMS
from transformers_mhc.outputs import OutputError, OutputFolder, check_output_path

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
# Files copied verbatim from SOURCE: everything a tokenizer may need, and the generation defaults.
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
COPIED_FILES = (*TOKENIZER_FILES, "generation_config.json")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Only what a conversion reads is fetched from the Hub.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "vocab.txt", "*.jinja"]
# Parameters a converted model has that no Llama-style checkpoint carries.
_NEW_PARAMETER_MARKERS = (".attn_hc.", ".mlp_hc.", "stream_readout.")
# Config fields that describe the checkpoint file, not the architecture: never carried over.
_NOT_CARRIED_OVER = {"architectures", "model_type", "transformers_version", "auto_map"}

REPORT_FILE = "mhc_conversion.json"
DEFAULT_PROMPT = "Once upon a time"


class ConversionError(ValueError):
    """A checkpoint cannot be converted, or the conversion arguments are invalid (the message says why)."""


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


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
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
            _check_finite(model, source_path, added_o_bias)
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
            with quiet_transformers():
                model.save_pretrained(staging, max_shard_size=max_shard_size)
            complete_auto_map(staging, model)  # also map `AutoModel`, whose class lives in the same code file
            del model
            for name in COPIED_FILES:
                if (source_path / name).is_file():
                    # content only: SOURCE may be read-only
                    shutil.copyfile(source_path / name, staging / name)

            if verify:
                _measure_exactness(
                    report, source_path, staging, prompt=prompt, num_greedy_tokens=num_greedy_tokens
                )
            report.seconds = time.perf_counter() - start
            _write_model_card(report, staging)
            report.files = sorted([p.name for p in staging.iterdir()] + [REPORT_FILE])
            (staging / REPORT_FILE).write_text(
                json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8"
            )
            folder.commit()
    except OutputError as error:  # OUTPUT taken by another conversion, or appeared meanwhile
        raise ConversionError(str(error)) from error
    report.seconds = time.perf_counter() - start
    return report


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


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------
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


def _write_model_card(report: ConversionReport, folder: Path) -> None:
    """Writes `README.md` with `transformers_mhc.hub.build_model_card` (the "converted" template when measured)."""
    conversion = None
    if report.max_abs_logit_diff is not None:
        conversion = {
            key: getattr(report, key)
            for key in (
                "max_abs_logit_diff",
                "greedy_agreement",
                "greedy_tokens",
                "num_tokens",
                "prompt",
                "dtype",
            )
        }
        conversion["source_model_type"] = report.source_model_type
    name = Path(report.output).name
    card = build_model_card(
        folder if _is_repo_name(name) else MHCConfig.from_pretrained(folder),
        model_id=name if _is_repo_name(name) else None,
        base_model=report.source,
        conversion=conversion,
        extra_notes="\n".join(f"- {note}" for note in report.notes) or None,
    )
    write_model_card(folder, card)


def _is_repo_name(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
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


def _checked_output(output: str | os.PathLike, overwrite: bool) -> Path:
    try:
        return check_output_path(output, overwrite=overwrite)
    except OutputError as error:
        raise ConversionError(str(error)) from error


def _legacy_leftovers(output: Path) -> list[str]:
    """Staging/backup folders of conversions killed under earlier versions: reported, never deleted (not provably
    ours)."""
    found = sorted(
        path.name
        for pattern in (f".{output.name}.converting-*", f".{output.name}.replaced-*")
        for path in output.parent.glob(pattern)
    )
    if not found:
        return []
    return [
        f"{output.parent} holds folders left by conversions interrupted under an earlier version ({', '.join(found)}); "
        "delete them if you do not need them."
    ]


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


def _check_finite(model: MHCForCausalLM, source_path: Path, added_o_bias: bool) -> None:
    """NaN or infinite weights copied from SOURCE would only surface later (in the exactness check, the card)."""
    with torch.no_grad():
        bad = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise ConversionError(
            f"SOURCE {source_path} has NaN or infinite weights ({shown}); the checkpoint is damaged: re-download or "
            f"re-save it."
        )


def _check_not_nested(source: Path, output: Path) -> None:
    source, output = source.resolve(), output.resolve()
    if output == source or source in output.parents:
        raise ConversionError(f"OUTPUT {output} is inside SOURCE {source}; SOURCE is never modified.")
    if output in source.parents:
        raise ConversionError(f"SOURCE {source} is inside OUTPUT {output}; replacing OUTPUT would delete it.")


def _sliding_window(config: PreTrainedConfig) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None  # Qwen2 with use_sliding_window=False: every layer is full attention
    return int(window)


def _try_tokenizer(source_path: Path):
    if not any((source_path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source_path)
    except Exception:  # noqa: BLE001 - a broken tokenizer only means we measure on random ids
        return None


def _supported_text() -> str:
    return "; ".join(
        f"{model_type} ({description})" for model_type, description in SUPPORTED_MODEL_TYPES.items()
    )


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


__all__ = [
    "ConversionError",
    "ConversionReport",
    "SUPPORTED_MODEL_TYPES",
    "convert_llama_to_mhc",
    "fixed_batch",
    "load_source_config",
    "mhc_config_from_source",
    "resolve_source",
]
