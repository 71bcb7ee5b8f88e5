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
"""lm-eval tasks for BBH, GSM8K and MMLU-Redux on local data, as a folder for ``--include_path``.

lm-eval's built-in tasks download their data from the Hub. :func:`write_task_folder` (command line:
``transformers-mhc eval-tasks``) writes a folder of ordinary lm-eval task YAMLs that run the built-in
tasks on the files of a local data folder instead, and nothing else changes: each task ``include:``\\ s
lm-eval's own YAML (prompts, few-shot examples, generation settings, filters, metrics) and overrides
only where its documents come from (``dataset_path: json`` + ``dataset_kwargs.data_files``, as lm-eval
documents for local data). Use it with lm-eval's own command line::

    transformers-mhc eval-tasks --data-dir ../shared/data --output mhc_tasks
    lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True \\
        --include_path mhc_tasks --tasks local_bbh_cot_fewshot_navigate --limit 2

or from Python with ``lm_eval.tasks.TaskManager(include_path="mhc_tasks")``. Names (all prefixed
``local_`` so that they never shadow a built-in task):

- groups ``local_bbh_cot_fewshot`` (27 tasks, 3-shot chain of thought), ``local_bbh_fewshot`` (3-shot
  direct answer), ``local_mmlu_redux`` (57 subjects in the four ``local_mmlu_redux_{stem, other,
  social_sciences, humanities}`` groups);
- tasks ``local_`` + the built-in name: ``local_bbh_cot_fewshot_navigate``, ``local_gsm8k_cot`` (8-shot
  CoT), ``local_mmlu_anatomy``, ...; any other lm-eval task given a local file (``--data-file``) becomes
  ``local_<task>``.

The YAMLs hold absolute paths (the data folder, lm-eval's installed task files): write the folder again
after moving the data or upgrading lm-eval. MMLU-Redux CSVs (mixed delimiters, one non-UTF-8 file,
choices as Python literals) are converted into JSONL files with the Hub's ``cais/mmlu`` columns inside
the folder, so that lm-eval reads every task with its stock JSON loader.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from transformers_mhc.evaluation import data

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

PREFIX = "local_"

# The 27 BIG-Bench Hard tasks (lm-eval's `bbh_cot_fewshot_*` / `bbh_fewshot_*` order; files `bbh/{name}.json`).
BBH_SUBJECTS = (
    "boolean_expressions",
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
)

# MMLU's 57 subjects under lm-eval's four categories (files `mmlu_redux/mmlu_{subject}.csv`).
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    "other": (
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ),
    "social_sciences": (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
}

# Short names users type -> our group or task.
ALIASES = {
    "bbh": "local_bbh_cot_fewshot",
    "bbh_cot": "local_bbh_cot_fewshot",
    "bbh_direct": "local_bbh_fewshot",
    "gsm8k": "local_gsm8k_cot",
    "mmlu": "local_mmlu_redux",
    "mmlu_redux": "local_mmlu_redux",
}
DEFAULT_TASKS = ("bbh", "gsm8k", "mmlu")

_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
# `datasets` packaged builder for a local file, by suffix.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
# Inside the folder: converted MMLU-Redux files, and the `datasets` cache of the files written here
# (kept in the folder so that temporary folders do not leave entries in the user's cache).
_MMLU_DIR = "mmlu_redux"
_CACHE_DIR = ".datasets_cache"


@dataclass(frozen=True)
class LocalTask:
    """One built-in lm-eval task run on a local file."""

    builtin: str  # lm-eval's task, e.g. "bbh_cot_fewshot_navigate"
    source: str  # its evaluation data, relative to the data folder
    json_field: str | None = None  # BBH files keep their records under "examples"

    @property
    def name(self) -> str:
        return PREFIX + self.builtin


@dataclass(frozen=True)
class LocalGroup:
    """An lm-eval group over local tasks or other local groups (names), with its aggregate."""

    members: tuple[str, ...]
    aggregate_metric_list: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    alias: str | None = None


def _mean(metric: str, filter_name: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"metric": metric, "aggregation": "mean", "weight_by_size": True}
    if filter_name:
        entry["filter_list"] = filter_name
    return entry


@functools.lru_cache(maxsize=1)
def catalogue() -> tuple[dict[str, LocalTask], dict[str, LocalGroup]]:
    """Every task and group the folder can hold, by name (a pure function of the constants above)."""
    tasks: dict[str, LocalTask] = {}
    groups: dict[str, LocalGroup] = {}
    for variant, aggregate in (
        ("bbh_cot_fewshot", _mean("exact_match", "get-answer")),
        ("bbh_fewshot", _mean("exact_match")),
    ):
        members = [LocalTask(f"{variant}_{s}", f"bbh/{s}.json", json_field="examples") for s in BBH_SUBJECTS]
        tasks.update((t.name, t) for t in members)
        groups[PREFIX + variant] = LocalGroup(tuple(t.name for t in members), (aggregate,))
    gsm8k = LocalTask("gsm8k_cot", "gsm8k/test.jsonl")
    tasks[gsm8k.name] = gsm8k
    for category, subjects in MMLU_CATEGORIES.items():
        members = [LocalTask(f"mmlu_{s}", f"{_MMLU_DIR}/mmlu_{s}.csv") for s in subjects]
        tasks.update((t.name, t) for t in members)
        groups[f"{PREFIX}mmlu_redux_{category}"] = LocalGroup(
            tuple(t.name for t in members), (_mean("acc"),), alias=category.replace("_", " ")
        )
    groups[PREFIX + "mmlu_redux"] = LocalGroup(
        tuple(f"{PREFIX}mmlu_redux_{c}" for c in MMLU_CATEGORIES), (_mean("acc"),), alias="mmlu_redux"
    )
    return tasks, groups


def leaf_tasks(name: str) -> list[str]:
    """The local tasks a local task or group name runs (recursively through subgroups)."""
    tasks, groups = catalogue()
    if name in groups:
        return [leaf for member in groups[name].members for leaf in leaf_tasks(member)]
    if name in tasks:
        return [name]
    raise KeyError(name)


def split_names(tasks: str | Iterable[str]) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]``."""
    items = tasks.split(",") if isinstance(tasks, str) else tasks
    return [str(t).strip() for t in items if str(t).strip()]


def resolve_tasks(tasks: str | Iterable[str], data_files: Iterable[str] = ()) -> list[str]:
    """Map user task names to the names in the folder, in order, without duplicates.

    Accepted: aliases (``bbh``, ``bbh_cot``, ``bbh_direct``, ``gsm8k``, ``mmlu``, ``mmlu_redux``), our
    group and task names (``local_*``), the built-in name of any task we run locally
    (``mmlu_anatomy``, ``bbh_cot_fewshot_navigate``, ``gsm8k_cot``), and the tasks named in
    ``data_files`` (which become ``local_<task>``). A task already inside a requested group is dropped
    (lm-eval refuses to run a task twice).
    """
    local_tasks, groups = catalogue()
    names = split_names(tasks)
    if not names:
        raise ValueError("no tasks given")
    data_files = set(data_files)
    # `local_<task>` of a data-file task is that task (resolved names resolve to themselves).
    names = [n.removeprefix(PREFIX) if n.removeprefix(PREFIX) in data_files else n for n in names]
    unused = data_files - set(names)
    if unused:
        raise ValueError(f"--data-file given for {sorted(unused)} but not listed in --tasks")
    resolved: list[str] = []
    for name in names:
        if name in data_files:
            local = PREFIX + name
        else:
            local = ALIASES.get(name, name if name.startswith(PREFIX) else PREFIX + name)
            if local not in local_tasks and local not in groups:
                choices = ", ".join([*ALIASES, *sorted(groups)])
                raise ValueError(
                    f"unknown task {name!r}: choose from {choices}, a task inside those groups (e.g. "
                    f"mmlu_anatomy), or give lm-eval task {name!r} a local data file with --data-file {name}=PATH"
                )
        if local not in resolved:
            resolved.append(local)
    covered = {leaf for name in resolved if name in groups for leaf in leaf_tasks(name)}
    covered |= {sub for name in resolved if name in groups for sub in _subgroups(name)}
    return [name for name in resolved if name not in covered]


def _subgroups(name: str) -> list[str]:
    _, groups = catalogue()
    found = []
    for member in groups[name].members:
        if member in groups:
            found += [member, *_subgroups(member)]
    return found


# ----------------------------------------------------------------------------- lm-eval's own task files


@functools.lru_cache(maxsize=1)
def builtin_task_manager() -> TaskManager:
    """lm-eval's index of its built-in tasks (built once per process: it takes several seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def builtin_task_yaml(task: str, task_manager: TaskManager | None = None) -> Path:
    """The YAML file that defines lm-eval's built-in *task* (not a group or tag)."""
    manager = task_manager or builtin_task_manager()
    if task not in manager.all_subtasks:
        if task in manager.all_groups or task in manager.all_tags:
            kind = "a group or tag"
        else:
            kind = "not an lm-eval task"
        raise ValueError(f"{task}: {kind}; name a single lm-eval task (e.g. hellaswag, piqa, triviaqa)")
    path = manager.task_index[task].yaml_path
    if path is None:
        raise ValueError(f"{task}: lm-eval defines it in Python only; it cannot be re-pointed at local files")
    return Path(path)


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs as data: ``!function`` references stay strings."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def read_task_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A task YAML with its ``include:`` chain merged (included keys first, the file's own win)."""
    path = Path(path)
    config = yaml.load(path.read_text(encoding="utf-8"), _TaskYamlLoader) or {}
    includes = config.pop("include", None) or []
    merged: dict[str, Any] = {}
    for include in [includes] if isinstance(includes, str) else includes:
        merged.update(read_task_yaml(path.parent / include))
    merged.update(config)
    return merged


# ----------------------------------------------------------------------------- writing the folder


def _header(text: str) -> str:
    return f"# {text}\n# Written by `transformers-mhc eval-tasks`; lm-eval reads it through --include_path.\n"


def _dump(path: Path, config: Mapping[str, Any], comment: str) -> None:
    body = yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True, width=120)
    path.write_text(_header(comment) + body, encoding="utf-8")


def _convert_mmlu_redux(source: Path, target: Path, skip_flagged: bool) -> int:
    """MMLU-Redux CSV -> JSONL with cais/mmlu's columns (plus Redux's annotation); returns the row count."""
    docs = data.read_mmlu_redux_csv(source)
    if skip_flagged:
        docs = [doc for doc in docs if doc["error_type"] == "ok"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return len(docs)


def _local_task_config(
    task: LocalTask, staging: Path, final: Path, data_dir: Path, skip_flagged: bool
) -> dict:
    """Dataset overrides for one of our tasks; converted files go to ``staging``, named as in ``final``."""
    source = data_dir / task.source
    if not source.is_file():
        raise data.DataDirError(f"data file not found: {source} (needed by {task.name})")
    if not task.source.startswith(_MMLU_DIR + "/"):
        kwargs: dict[str, Any] = {"data_files": {"test": str(source)}}
        if task.json_field:
            kwargs["field"] = task.json_field
        return {"dataset_kwargs": kwargs}
    converted = Path(_MMLU_DIR) / f"{source.stem}.jsonl"
    _convert_mmlu_redux(source, staging / converted, skip_flagged)
    return {
        "dataset_kwargs": {
            "data_files": {"test": str(final / converted)},
            "cache_dir": str(final / _CACHE_DIR),
        },
        # Redux has no dev split: few-shot examples (0 by default, as in lm-eval's MMLU) come from the
        # subject's other questions; lm-eval never shows a question to itself.
        "fewshot_split": "test",
    }


def _data_file_config(task: str, files: Mapping[str | None, str], task_manager: TaskManager | None) -> dict:
    """Overrides running built-in ``task`` on the user's files (split -> path, ``None`` = the split the
    task is evaluated on). The files must have the Hub data set's columns."""
    builtin = read_task_yaml(builtin_task_yaml(task, task_manager))
    eval_split = builtin.get("test_split") or builtin.get("validation_split")
    local = {
        eval_split if split is None else split: str(Path(path).expanduser().resolve())
        for split, path in files.items()
    }
    if eval_split not in local:
        raise ValueError(
            f"--data-file {task}: give the file for its evaluation split {eval_split!r} ({task}=PATH)"
        )
    missing = [path for path in local.values() if not Path(path).is_file()]
    if missing:
        raise data.DataDirError(f"--data-file {task}: file not found: {missing[0]}")
    builders = {_BUILDERS.get(Path(path).suffix.lower()) for path in local.values()}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"--data-file {task}: all files must share one format among {sorted(_BUILDERS)}, got "
            f"{sorted(Path(p).name for p in local.values())}"
        )
    config: dict[str, Any] = {
        "dataset_path": builders.pop(),
        "dataset_name": None,
        "dataset_kwargs": {"data_files": local},
    }
    for key in _SPLIT_KEYS:  # splits the task names but the user did not provide are switched off
        if builtin.get(key) and builtin[key] not in local:
            config[key] = None
    has_samples = bool((builtin.get("fewshot_config") or {}).get("samples"))
    fewshot_source = builtin.get("fewshot_split") or builtin.get("training_split")
    if not has_samples and fewshot_source not in local:
        # Few-shot examples then come from the evaluation split. Declaring it the test split as well
        # makes lm-eval leave each question out of its own prompt.
        config.update(test_split=eval_split, validation_split=None, fewshot_split=eval_split)
    return config


def _task_yaml(name: str, path: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "task": name,
        "include": str(path),
        # The built-in file's tags would make this task a member of built-in groups (e.g. `mmlu`).
        "tag": None,
        "dataset_path": "json",
        "dataset_name": None,
        **overrides,
    }


def _replace_folder(staging: Path, output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output} is not empty; pass --overwrite to replace it")
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if output.is_dir():
            output.rmdir()
        os.replace(staging, output)


def write_task_folder(
    output: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    *,
    tasks: str | Iterable[str] | None = None,
    data_files: Mapping[str, str | os.PathLike[str] | Mapping[str | None, str]] | None = None,
    skip_flagged_mmlu: bool = False,
    overwrite: bool = False,
    task_manager: TaskManager | None = None,
) -> list[str]:
    """Write lm-eval task YAMLs running BBH / GSM8K / MMLU-Redux (and ``data_files`` tasks) on local data.

    Args:
        output: the folder to create (pass it to lm-eval as ``--include_path`` / ``TaskManager(
            include_path=...)``). It must not exist or be empty, unless ``overwrite``; it is written
            beside it first and renamed into place when complete.
        data_dir: the folder holding ``bbh/``, ``gsm8k/``, ``mmlu_redux/``; default: see
            :func:`transformers_mhc.evaluation.data.resolve_data_dir`.
        tasks: names as for :func:`resolve_tasks`; default: every task and group. Only the data the
            named tasks read must exist.
        data_files: other lm-eval tasks on local files: task -> path of its evaluation split, or task ->
            {split (``None`` = evaluation split) -> path}. The files must have the Hub data set's columns.
        skip_flagged_mmlu: drop MMLU-Redux questions whose ``error_type`` is not ``ok``.
        task_manager: an lm-eval ``TaskManager`` indexing the built-in tasks (for ``data_files``).

    Returns:
        the names to pass to lm-eval for ``tasks`` (resolved, in order).
    """
    local_tasks, groups = catalogue()
    files = {
        task: ({None: spec} if isinstance(spec, (str, os.PathLike)) else dict(spec))
        for task, spec in (data_files or {}).items()
    }
    names = resolve_tasks(
        tasks if tasks is not None else [*groups, local_tasks["local_gsm8k_cot"].name], files
    )
    wanted_groups = {sub for name in names if name in groups for sub in [name, *_subgroups(name)]}
    wanted_tasks = [
        leaf for name in names if name in local_tasks or name in groups for leaf in leaf_tasks(name)
    ]
    folder_data = data.resolve_data_dir(data_dir) if wanted_tasks else None
    output = Path(output).expanduser().absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        # The YAMLs hold the final folder's paths (the converted files and the cache live inside it).
        for name in wanted_tasks:
            task = local_tasks[name]
            overrides = _local_task_config(task, staging, output, folder_data, skip_flagged_mmlu)
            config = _task_yaml(name, builtin_task_yaml(task.builtin, task_manager), overrides)
            _dump(
                staging / f"{name}.yaml", config, f"lm-eval's {task.builtin} on {folder_data / task.source}"
            )
        for name in sorted(wanted_groups):
            group = groups[name]
            config = {"group": name, "task": list(group.members)}
            if group.alias:
                config["group_alias"] = group.alias
            config["aggregate_metric_list"] = [dict(entry) for entry in group.aggregate_metric_list]
            config["metadata"] = {"version": 1.0}
            _dump(staging / f"{name}.yaml", config, f"{len(leaf_tasks(name))} tasks on local data")
        for task, task_files in files.items():
            path = builtin_task_yaml(task, task_manager)
            config = _task_yaml(PREFIX + task, path, _data_file_config(task, task_files, task_manager))
            _dump(staging / f"{PREFIX}{task}.yaml", config, f"lm-eval's {task} on local files")
        _replace_folder(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return names


# ----------------------------------------------------------------------------- command line


def parse_data_file(spec: str) -> tuple[str, str | None, str]:
    """Parse ``TASK=PATH`` or ``TASK:SPLIT=PATH`` (a ``--data-file`` value) into (task, split, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--data-file expects TASK=PATH or TASK:SPLIT=PATH, got {spec!r}")
    task, _, split = name.partition(":")
    return task, split or None, path


def data_files_from_args(specs: Sequence[str]) -> dict[str, dict[str | None, str]]:
    """``--data-file`` values -> ``{task: {split: path}}``."""
    files: dict[str, dict[str | None, str]] = {}
    for spec in specs:
        task, split, path = parse_data_file(spec)
        files.setdefault(task, {})[split] = path
    return files


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data options shared by ``eval-tasks`` and ``eval``."""
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"data folder holding bbh/, gsm8k/, mmlu_redux/ (default: ${data.DATA_DIR_ENV} or ../shared/data)",
    )
    parser.add_argument(
        "--data-file",
        action="append",
        default=[],
        metavar="TASK[:SPLIT]=PATH",
        help="run lm-eval task TASK (as local_TASK) on a local file (.json/.jsonl/.csv/.parquet) with the Hub "
        "data set's columns; without :SPLIT the file is the task's evaluation split; repeat for more",
    )
    parser.add_argument(
        "--skip-flagged-mmlu",
        action="store_true",
        help="drop MMLU-Redux questions whose error_type is not 'ok'",
    )


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``transformers-mhc eval-tasks``."""
    parser = subparsers.add_parser(
        "eval-tasks",
        help="write lm-eval task YAMLs for BBH, GSM8K, MMLU-Redux on local data (for lm_eval --include_path)",
        description=(
            "Write a folder of lm-eval task YAMLs that run lm-eval's own BBH, GSM8K and MMLU tasks on local "
            "files, then use lm-eval's own command line: lm_eval --model hf --model_args pretrained=PATH "
            "--include_path OUTPUT --tasks local_bbh_cot_fewshot_navigate. Groups: local_bbh_cot_fewshot, "
            "local_bbh_fewshot, local_mmlu_redux; tasks: local_ + lm-eval's name (local_gsm8k_cot, "
            "local_mmlu_anatomy, ...)."
        ),
    )
    parser.add_argument("--output", required=True, help="folder to write (must be new or empty)")
    parser.add_argument("--tasks", default=None, help="comma-separated names (default: every task and group)")
    add_data_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """``transformers-mhc eval-tasks``: write the folder and print how to run lm-eval on it."""
    try:
        names = write_task_folder(
            args.output,
            args.data_dir,
            tasks=args.tasks,
            data_files=data_files_from_args(args.data_file),
            skip_flagged_mmlu=args.skip_flagged_mmlu,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as err:  # DataDirError and FileExistsError are OSErrors
        print(f"transformers-mhc eval-tasks: error: {err}", file=sys.stderr)
        return 2
    count = len(list(Path(args.output).glob("*.yaml")))
    print(f"wrote {count} task and group files to {args.output}; for example:")
    print(
        "  lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True "
        f"--include_path {args.output} --tasks {','.join(names[:3])} --limit 10"
    )
    return 0
