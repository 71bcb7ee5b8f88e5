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
"""Writing OUTPUT: the path checks made before anything is loaded, the staged checkpoint, its model card and
the conversion report."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from transformers_mhc import MHCConfig, MHCForCausalLM
from transformers_mhc.hub import build_model_card, complete_auto_map, write_model_card
from transformers_mhc.outputs import OutputError, check_output_path

from .plan import TOKENIZER_FILES, ConversionError
from .weights import quiet_transformers

if TYPE_CHECKING:
    from .convert import ConversionReport

# Files copied verbatim from SOURCE: everything a tokenizer may need, and the generation defaults.
COPIED_FILES = (*TOKENIZER_FILES, "generation_config.json")
REPORT_FILE = "mhc_conversion.json"


def _checked_output(output: str | os.PathLike, overwrite: bool) -> Path:
    try:
        return check_output_path(output, overwrite=overwrite)
    except OutputError as error:
        raise ConversionError(str(error)) from error


def _check_not_nested(source: Path, output: Path) -> None:
    source, output = source.resolve(), output.resolve()
    if output == source or source in output.parents:
        raise ConversionError(f"OUTPUT {output} is inside SOURCE {source}; SOURCE is never modified.")
    if output in source.parents:
        raise ConversionError(f"SOURCE {source} is inside OUTPUT {output}; replacing OUTPUT would delete it.")


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


def _save_staged(model: MHCForCausalLM, source_path: Path, staging: Path, max_shard_size: int) -> None:
    """Saves the converted model with its remote code into `staging`, and copies SOURCE's tokenizer and generation
    files beside it."""
    with quiet_transformers():
        model.save_pretrained(staging, max_shard_size=max_shard_size)
    complete_auto_map(staging, model)  # also map `AutoModel`, whose class lives in the same code file
    for name in COPIED_FILES:
        if (source_path / name).is_file():
            # content only: SOURCE may be read-only
            shutil.copyfile(source_path / name, staging / name)


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


def _write_report(report: ConversionReport, folder: Path) -> None:
    """Writes `mhc_conversion.json`, whose `files` lists everything in OUTPUT (itself included)."""
    report.files = sorted([p.name for p in folder.iterdir()] + [REPORT_FILE])
    (folder / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
