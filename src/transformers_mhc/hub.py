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
"""Saving and uploading transformers-mhc models to the Hugging Face Hub, and the `push` / `card` commands.

- `model.save_pretrained` / `model.push_to_hub` (transformers' methods, through `models/hub_mixin.py`) write a
  complete `auto_map` and the package's model card; `model.push_to_hub` uploads through `push_to_hub` below.
- `save_for_hub` writes what a repository holds: weights, `config.json` with a complete `auto_map`, the model
  code (so `trust_remote_code=True` works without the package), the tokenizer and `README.md`.
- `push_folder` uploads a saved folder as it is, without loading the model; `push_to_hub` saves a model into a
  temporary folder and uploads that. Both use the standard client (`HfApi.create_repo` + `HfApi.create_commit`):
  the endpoint is `HF_ENDPOINT` (read when `huggingface_hub` is imported) and `HF_HUB_OFFLINE=1` makes them
  raise `OfflineModeIsEnabled` before anything is written or sent.
- `transformers-mhc push PATH REPO_ID` and `transformers-mhc card PATH` expose both on the command line.

The model cards themselves are built in `transformers_mhc.model_card` (and evaluation results parsed in
`transformers_mhc.model_index`); their public names are re-exported here.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from transformers import PreTrainedModel
from transformers.dynamic_module_utils import get_relative_import_files

from .model_card import (
    MODEL_ID_PLACEHOLDER,
    README_NAME,
    SUPPORTED_MODEL_TYPES,
    build_model_card,
    card_for_folder,
    write_model_card,
)
from .model_index import parse_eval_results
from .models.hub_mixin import family_auto_map
from .models.modeling_decay_linear_attn import DecayLinearAttnForCausalLM
from .models.modeling_mhc import MHCForCausalLM

DEFAULT_COMMIT_MESSAGE = "Upload model with transformers-mhc"

# The causal LM class of each model type: its code file defines the family `auto_map` points to.
_CAUSAL_LM_CLASSES: dict[str, type[PreTrainedModel]] = {
    "mhc": MHCForCausalLM,
    "decay_linear_attn": DecayLinearAttnForCausalLM,
}

# Top-level files of a saved folder that belong in a model repository (besides README.md, config.json and the
# model code): weights, generation config, tokenizer. Anything else stays local: conversion reports (they name
# local paths), Trainer state, stray scripts, sub-folders such as checkpoints.
REPO_FILE_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "model.safetensors.index.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.*",
)


# ------------------------------------------------------------------------------------------------
# auto_map
# ------------------------------------------------------------------------------------------------
def complete_auto_map(folder: str | os.PathLike, model: PreTrainedModel | type[PreTrainedModel]) -> None:
    """Gives `folder/config.json` the complete `auto_map` of the model's family, if it maps remote code at all.

    `model.save_pretrained` of our models already writes it (`models/hub_mixin.py`); this completes folders
    written otherwise (older versions of the package, or a class saved without the mixin). Only classes whose
    code file is in `folder` are mapped; `config.json` is replaced atomically and only when something changes.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    data = json.loads(config_file.read_text(encoding="utf-8"))
    auto_map = data.get("auto_map")
    if not isinstance(auto_map, dict):
        return  # not a remote-code model
    model_class = model if isinstance(model, type) else type(model)
    family = {
        auto_class: reference
        for auto_class, reference in family_auto_map(model_class).items()
        if (folder / f"{reference.split('.')[0]}.py").is_file()
    }
    if all(auto_map.get(auto_class) == reference for auto_class, reference in family.items()):
        return
    data["auto_map"] = dict(sorted({**auto_map, **family}.items()))
    temporary = config_file.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, config_file)


def _folder_auto_map(folder: Path, config: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """The complete `auto_map` for a saved folder and the code files it needs (all checked to be present).

    Raises `ValueError` naming what is missing: the folder then cannot be uploaded as it is.
    """
    model_type = config.get("model_type")
    if model_type not in _CAUSAL_LM_CLASSES:
        raise ValueError(
            f"{folder} holds a model of type {model_type!r}, not a transformers-mhc model "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})."
        )
    auto_map = family_auto_map(_CAUSAL_LM_CLASSES[model_type])
    code_files = sorted({f"{reference.split('.')[0]}.py" for reference in auto_map.values()})
    missing = [name for name in code_files if not (folder / name).is_file()]
    if not missing:
        try:
            for name in list(code_files):
                code_files += [Path(path).name for path in get_relative_import_files(folder / name)]
        except OSError as error:  # a relative import whose file was not saved
            missing.append(Path(error.filename or str(error)).name)
    if missing:
        raise ValueError(
            f"{folder} lacks the model code for trust_remote_code: {', '.join(sorted(missing))}."
        )
    return {**(config.get("auto_map") or {}), **auto_map}, sorted(set(code_files))


def folder_upload_problem(folder: str | os.PathLike) -> str | None:
    """Why `push_folder` cannot upload `folder` as it is (no config / weights / code), or None if it can."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        _folder_auto_map(folder, config)
    except (OSError, ValueError) as error:
        return str(error)
    if not any(folder.glob("*.safetensors")):
        return f"{folder} has no safetensors weights"
    return None


# ------------------------------------------------------------------------------------------------
# Saving and uploading
# ------------------------------------------------------------------------------------------------
def _check_online(repo_id: str) -> None:
    if constants.is_offline_mode():
        raise OfflineModeIsEnabled(
            f"Cannot push to '{repo_id}': offline mode is enabled (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE to "
            "upload, or keep the model local with `save_pretrained`."
        )


def _check_model(model: Any) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"Expected a transformers PreTrainedModel, got {type(model).__name__} (merge PEFT adapters with "
            "`merge_and_unload()` first)."
        )


def save_for_hub(
    model: PreTrainedModel,
    folder: str | os.PathLike,
    *,
    tokenizer: Any | None = None,
    card: ModelCard | None = None,
    max_shard_size: int | str = "50GB",
) -> Path:
    """Writes everything a Hub repository of `model` holds into `folder`.

    That is: the weights (safetensors), `config.json` whose `auto_map` covers the model's family (`AutoConfig`,
    `AutoModel`, `AutoModelForCausalLM`), the code files (`configuration_*.py`, `modeling_*.py` and their
    helpers, copied by `save_pretrained`), the generation config, the tokenizer if given and `README.md`: `card`
    if given, else the card `save_pretrained` writes into a folder without one.
    """
    _check_model(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if card is not None:
        write_model_card(folder, card)  # first: `save_pretrained` only writes a card where there is none
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    complete_auto_map(folder, model)  # a no-op for our models; kept for models saved without the mixin
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    card: ModelCard | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
) -> CommitInfo:
    """Uploads a saved model folder as it is, in one commit, with a complete `auto_map` and the package's card.

    Uploaded: `config.json` with the complete `auto_map` of its model family (the file on disk is left as it is),
    the model code it maps (and its relative imports), `README.md` and the top-level files matching
    `REPO_FILE_PATTERNS` (weights, generation config, tokenizer). The card is `card`, else the folder's
    README.md, else one built with `card_for_folder`; `repo_id` replaces the placeholder of its loading snippet
    and `tags` are added to its metadata. The repository is created if needed (`private` applies then).

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.

    Raises:
        OfflineModeIsEnabled: `HF_HUB_OFFLINE=1` is set; nothing is sent.
        huggingface_hub.errors.HFValidationError: `repo_id` is not a valid repository id.
        ValueError: `folder` is not a saved transformers-mhc model with its code (see `folder_upload_problem`),
            or its README.md metadata does not parse.
        huggingface_hub.errors.HfHubHTTPError: the Hub refused a request (authentication, invalid metadata, ...).
        httpx.TransportError (httpx2 with huggingface_hub 2.x): the endpoint cannot be reached.
    """
    _check_online(repo_id)
    validate_repo_id(repo_id)
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a saved model folder: it has no config.json.")
    problem = folder_upload_problem(folder)
    if problem is not None:
        raise ValueError(problem)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["auto_map"], code_files = _folder_auto_map(folder, config)

    if card is None:
        readme = folder / README_NAME
        card = ModelCard.load(readme) if readme.is_file() else card_for_folder(folder, model_id=repo_id)
    card = ModelCard(str(card))  # a copy: the caller's card is left as it is
    card.text = card.text.replace(f'"{MODEL_ID_PLACEHOLDER}"', f'"{repo_id}"')
    if tags:
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))

    names = sorted(
        path.name
        for path in folder.iterdir()
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in REPO_FILE_PATTERNS)
    )
    operations = [
        CommitOperationAdd(path_in_repo="config.json", path_or_fileobj=_json_bytes(config)),
        CommitOperationAdd(path_in_repo=README_NAME, path_or_fileobj=str(card).encode("utf-8")),
    ]
    operations += [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in sorted(set(names) | set(code_files))
    ]
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
    )


def _json_bytes(data: dict[str, Any]) -> bytes:
    """JSON as `PreTrainedConfig.save_pretrained` writes it (indent 2, sorted keys)."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def repo_card(
    repo_id: str, *, token: str | bool | None = None, revision: str | None = None
) -> ModelCard | None:
    """The README.md card of the Hub repository `repo_id`, or None if it has none (or does not exist yet)."""
    # A throw-away cache: the card is read once, and tests must not write into the user's cache.
    with tempfile.TemporaryDirectory(prefix="transformers-mhc-card-") as cache_dir:
        try:
            path = HfApi(token=token).hf_hub_download(
                repo_id, README_NAME, revision=revision, cache_dir=cache_dir
            )
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            return None
        return ModelCard.load(path)


def push_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    *,
    tokenizer: Any | None = None,
    card: ModelCard | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "50GB",
    tags: list[str] | None = None,
    keep_repo_card: bool = False,
) -> CommitInfo:
    """Uploads `model` (weights, config with `auto_map`, remote code), its tokenizer and card to the Hub.

    This is what `model.push_to_hub(repo_id)` runs for our models (with `keep_repo_card=True`). Everything is
    written by `save_for_hub` into a temporary folder and uploaded in one commit by `push_folder`. The endpoint
    is `HF_ENDPOINT` (read when `huggingface_hub` is imported); the token is `token`, else `HF_TOKEN` or the
    stored login. The card is `card`; else, with `keep_repo_card`, the README.md the repository already has (as
    transformers' `push_to_hub` does: a card edited on the Hub is not lost); else one built with
    `build_model_card(model, model_id=repo_id)`. A card rendered without `model_id` gets `repo_id` filled into
    its loading snippet; `tags` are added to its metadata.

    Returns:
        The `huggingface_hub.CommitInfo` of the upload commit.

    Raises:
        OfflineModeIsEnabled: `HF_HUB_OFFLINE=1` is set; nothing is written or sent.
        huggingface_hub.errors.HFValidationError: `repo_id` is not a valid repository id.
        huggingface_hub.errors.HfHubHTTPError: the Hub refused a request (authentication, invalid metadata, ...).
        httpx.TransportError (httpx2 with huggingface_hub 2.x): the endpoint cannot be reached.
    """
    _check_online(repo_id)
    validate_repo_id(repo_id)
    _check_model(model)
    if card is None and keep_repo_card:
        # Create first, as transformers does: an unreachable endpoint fails at once, not after download retries.
        HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        card = repo_card(repo_id, token=token, revision=revision)
    if card is None:
        card = build_model_card(model, model_id=repo_id)
    with tempfile.TemporaryDirectory(prefix="transformers-mhc-push-") as folder:
        save_for_hub(model, folder, tokenizer=tokenizer, card=card, max_shard_size=max_shard_size)
        return push_folder(
            folder,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            tags=tags,
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


def _transport_errors() -> tuple[type[Exception], ...]:
    """The errors for "no answer from the endpoint" of the HTTP library of huggingface_hub (httpx; httpx2 in 2.x)."""
    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _one_line(error: BaseException) -> str:
    """The message of `error` on one line (Hub errors carry the server's answer on further lines)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


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
        print(f"transformers-mhc card: error: {_one_line(error)}", file=sys.stderr)
        return 1
    print(f"Wrote {path}")
    return 0


def _run_push(args: argparse.Namespace) -> int:
    folder = Path(args.path)
    upload = dict(private=args.private, token=args.token, commit_message=args.commit_message)
    try:
        _check_online(args.repo_id)
        validate_repo_id(args.repo_id)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a saved model folder: it has no config.json.")
        card = None
        if args.eval_results or not (folder / README_NAME).is_file():
            eval_results = _read_json(args.eval_results, "evaluation results") if args.eval_results else None
            card = card_for_folder(folder, model_id=args.repo_id, eval_results=eval_results)
        problem = folder_upload_problem(folder)
        if problem is None:
            info = push_folder(folder, args.repo_id, card=card, **upload)
        else:
            # E.g. `.bin` weights or missing code: load the model and upload what `save_pretrained` writes now.
            print(f"transformers-mhc push: {problem}; loading the model to save it afresh.", file=sys.stderr)
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
            card = card or ModelCard.load(folder / README_NAME)
            info = push_to_hub(model, args.repo_id, tokenizer=tokenizer, card=card, **upload)
    except _transport_errors() as error:  # no answer at all: wrong HF_ENDPOINT, no network, proxy, ...
        print(
            f"transformers-mhc push: error: cannot reach the Hub at {constants.ENDPOINT} ({_one_line(error)}); "
            "check HF_ENDPOINT and the network.",
            file=sys.stderr,
        )
        return 1
    except (OfflineModeIsEnabled, ValueError, TypeError, OSError, HFValidationError) as error:
        # HfHubHTTPError is an OSError: authentication, missing permissions, invalid metadata, ...
        print(f"transformers-mhc push: error: {_one_line(error)}", file=sys.stderr)
        return 1
    print(f"Pushed {folder} to {args.repo_id}: {info.commit_url}")
    return 0


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    """Registers `transformers-mhc push` and `transformers-mhc card`."""
    push = subparsers.add_parser(
        "push",
        help="upload a saved model (weights, config, remote code, tokenizer, card) to the Hub",
        description=(
            "Upload the model saved in PATH to the Hub repository REPO_ID (created if needed), as it is on disk: "
            "weights, config.json with a complete auto_map, the model code for trust_remote_code, the tokenizer "
            "and README.md (other files, e.g. the conversion report or checkpoints, stay local). The card is "
            "PATH's README.md, or is (re)built when there is none or --eval-results is given. A folder without "
            "safetensors weights or model code is loaded and saved afresh first. The endpoint is HF_ENDPOINT "
            "(default https://huggingface.co; set it for a private or local Hub), the token --token, else "
            "HF_TOKEN or the stored login; HF_HUB_OFFLINE=1 refuses to push."
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
    push.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
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
    "DEFAULT_COMMIT_MESSAGE",
    "MODEL_ID_PLACEHOLDER",
    "README_NAME",
    "REPO_FILE_PATTERNS",
    "SUPPORTED_MODEL_TYPES",
    "add_subparser",
    "build_model_card",
    "card_for_folder",
    "complete_auto_map",
    "folder_upload_problem",
    "parse_eval_results",
    "push_folder",
    "push_to_hub",
    "repo_card",
    "save_for_hub",
    "write_model_card",
]
