"""The downstream suite (BBH, GSM8K, MMLU-Redux, ...) on local data, through the lm-eval harness.

Prompts, few-shot examples, filters and metrics are lm-eval's own: the task definitions in
``tasks/`` are lm-eval groups that list the built-in tasks by name and override only how their data
is loaded (see ``data.py``). ``TaskManager(include_path=tasks/)`` indexes them, so they also work with
the plain ``lm_eval`` command::

    lm_eval --model hf --model_args pretrained=PATH --include_path $(python -c \\
        "import transformers_mhc.evaluation.suite as s; print(s.TASKS_DIR)") \\
        --tasks local_bbh_cot_fewshot --metadata '{"data_dir": "../shared/data"}'

Python API: :func:`evaluate_model` (a path, a ``trust_remote_code`` checkpoint or an in-process
model). Command line: ``transformers-mhc eval`` (:func:`add_subparser`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from transformers_mhc.evaluation import data
from transformers_mhc.evaluation.io_utils import write_atomic

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# Our lm-eval groups (defined in tasks/) and the short names users type.
LOCAL_GROUPS = ("local_bbh_cot_fewshot", "local_bbh_fewshot", "local_gsm8k_cot", "local_mmlu_redux")
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


@functools.lru_cache(maxsize=1)
def get_task_manager() -> TaskManager:
    """lm-eval's task index plus our ``tasks/`` folder (built once per process: indexing takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


class FunctionRef(str):
    """A function written into a task YAML as lm-eval's ``!function module.name`` tag."""


class _SpecDumper(yaml.SafeDumper):
    pass


_SpecDumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


class _IgnoreTagsLoader(yaml.SafeLoader):
    """Reads our group YAMLs for their task lists only (``!function`` values are left unresolved)."""


_IgnoreTagsLoader.add_constructor(
    "!function", lambda loader, node: FunctionRef(loader.construct_scalar(node))
)


LOAD_LOCAL_FILES = FunctionRef("transformers_mhc.evaluation.data.load_local_files")


def _group_yaml(task_manager: TaskManager, group: str) -> Path:
    return Path(task_manager.task_index[group].yaml_path)


def _leaf_names(cfg: Mapping[str, Any]) -> list[str]:
    """Task names listed (recursively, through inline subgroups) in a group config."""
    names = []
    for item in cfg.get("task", []):
        if isinstance(item, str):
            names.append(item)
        elif "group" in item:
            names.extend(_leaf_names(item))
        else:
            names.append(item["task"])
    return names


def _select_members(items: list[Any], wanted: set[str] | None, extra_kwargs: Mapping[str, Any]) -> list[Any]:
    """The ``wanted`` entries of a group's ``task:`` list (all if ``None``, recursing into inline
    subgroups, dropping emptied ones), each with ``extra_kwargs`` added to its ``dataset_kwargs``."""
    kept = []
    for item in items:
        if "group" in item:
            members = _select_members(item["task"], wanted, extra_kwargs)
            if members:
                kept.append({**item, "task": members})
        elif wanted is None or item["task"] in wanted:
            kept.append({**item, "dataset_kwargs": {**item.get("dataset_kwargs", {}), **extra_kwargs}})
    return kept


def parse_data_file(spec: str) -> tuple[str, str | None, str]:
    """Parse ``TASK=PATH`` or ``TASK:SPLIT=PATH`` (a ``--data-file`` value) into (task, split, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--data-file expects TASK=PATH or TASK:SPLIT=PATH, got {spec!r}")
    task, _, split = name.partition(":")
    return task, split or None, path


def _data_file_config(
    task_manager: TaskManager, task: str, files: Mapping[str | None, str], data_dir: str | None
) -> dict[str, Any]:
    """A group config running built-in ``task`` on local files (split -> path, ``None`` = the split the
    task is evaluated on). The files must have the Hub data set's columns."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager.task_index.get(task)
    if entry is None or entry.kind is not Kind.TASK:
        kind = "a group or tag" if entry is not None else "not an lm-eval task"
        raise ValueError(
            f"--data-file {task}: {kind}; name a single lm-eval task (e.g. hellaswag, piqa, triviaqa)"
        )
    raw = load_yaml(entry.yaml_path, resolve_func=False)
    eval_split = raw.get("test_split") or raw.get("validation_split")
    local = {
        eval_split if split is None else split: str(Path(path).expanduser().resolve())
        for split, path in files.items()
    }
    if eval_split not in local:
        raise ValueError(
            f"--data-file {task}: give the file for its evaluation split {eval_split!r} ({task}=PATH)"
        )
    overrides: dict[str, Any] = {
        "task": task,
        "custom_dataset": LOAD_LOCAL_FILES,
        "dataset_path": "local",
        "dataset_kwargs": {"local_files": local, "local_data_dir": data_dir},
    }
    for key in _SPLIT_KEYS:  # splits the task names but the user did not provide are switched off
        if raw.get(key) and raw[key] not in local:
            overrides[key] = None
    has_samples = bool((raw.get("fewshot_config") or {}).get("samples"))
    fewshot_source = raw.get("fewshot_split") or raw.get("training_split")
    if not has_samples and fewshot_source not in local:
        # Few-shot examples then come from the evaluation split. Declaring it the test split as well
        # makes lm-eval leave each question out of its own prompt.
        overrides.update(test_split=eval_split, validation_split=None, fewshot_split=eval_split)
    config: dict[str, Any] = {"group": f"local_{task}", "task": [overrides]}
    metrics = [m["metric"] for m in raw.get("metric_list") or () if isinstance(m.get("metric"), str)]
    if metrics:  # report the group like ours (a one-task group would otherwise show no scores)
        config["aggregate_metric_list"] = [{"metric": m, "weight_by_size": True} for m in metrics]
    return config


def build_task_configs(
    tasks: str | Sequence[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    data_files: Mapping[str, str | Mapping[str | None, str]] | None = None,
    skip_flagged_mmlu: bool = False,
    task_manager: TaskManager | None = None,
) -> tuple[list[dict[str, Any]], Path | None]:
    """Turn user task names into lm-eval group configs that read local data.

    Args:
        tasks: names or a comma-separated string: aliases (``bbh``, ``bbh_direct``, ``gsm8k``,
            ``mmlu``), our group names (``local_*``), any task inside them (``mmlu_anatomy``,
            ``bbh_cot_fewshot_navigate``, ``gsm8k_cot``) or a task given in ``data_files``.
        data_dir: the data folder; default: see :func:`data.resolve_data_dir`.
        data_files: other lm-eval tasks on local files: task -> path of its evaluation split, or
            task -> {split (``None`` = evaluation split) -> path}.
        skip_flagged_mmlu: drop MMLU-Redux questions whose ``error_type`` is not ``ok``.

    Returns:
        the configs (YAML-ready dicts; ours ``include:`` the shipped group files and list only the
        selected tasks, with the data folder in each task's ``dataset_kwargs``) and the data folder
        (``None`` when only ``data_files`` tasks run and no ``data_dir`` was given).
    """
    task_manager = task_manager or get_task_manager()
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ValueError("no tasks given")
    data_files = {
        task: ({None: files} if isinstance(files, (str, os.PathLike)) else dict(files))
        for task, files in (data_files or {}).items()
    }
    unused = set(data_files) - set(names)
    if unused:
        raise ValueError(f"--data-file given for {sorted(unused)} but not listed in --tasks")
    group_cfgs = {
        group: yaml.load(_group_yaml(task_manager, group).read_text(), _IgnoreTagsLoader)
        for group in LOCAL_GROUPS
    }
    members = {group: set(_leaf_names(cfg)) for group, cfg in group_cfgs.items()}

    wanted: dict[str, set[str] | None] = {}  # group -> its selected tasks (None: all)
    for name in names:
        group = ALIASES.get(name, name)
        if name in data_files:
            continue
        if group in group_cfgs:
            wanted[group] = None
            continue
        owner = next((g for g, tasks_ in members.items() if name in tasks_), None)
        if owner is None:
            choices = ", ".join([*ALIASES, *LOCAL_GROUPS])
            raise ValueError(
                f"unknown task {name!r}: choose from {choices}, a task inside those groups (e.g. mmlu_anatomy), "
                f"or give lm-eval task {name!r} a local data file with --data-file {name}=PATH"
            )
        if wanted.get(owner, set()) is not None:
            wanted.setdefault(owner, set()).add(name)

    resolved = data.resolve_data_dir(data_dir) if wanted or data_dir is not None else None
    folder = str(resolved) if resolved else None
    configs = []
    for group in LOCAL_GROUPS:  # fixed order: stable output whatever the order on the command line
        if group not in wanted:
            continue
        extra: dict[str, Any] = {"local_data_dir": folder}
        if group == "local_mmlu_redux":
            extra["mmlu_redux_skip_flagged"] = skip_flagged_mmlu
        configs.append(
            {
                # Everything else (loader, aggregation, few-shot split) comes from the shipped file.
                "include": str(_group_yaml(task_manager, group)),
                "group": group,
                "task": _select_members(group_cfgs[group]["task"], wanted[group], extra),
            }
        )
    configs += [
        _data_file_config(task_manager, name, data_files[name], folder)
        for name in names
        if name in data_files
    ]
    return configs, resolved


@contextlib.contextmanager
def registered_task_configs(
    task_manager: TaskManager, configs: Sequence[Mapping[str, Any]]
) -> Iterator[list[str]]:
    """Make configs from :func:`build_task_configs` loadable by name for the duration of the block.

    They are written as YAML files and indexed by lm-eval's own ``TaskIndex``; the entries are added to
    the (cached) task manager's index and removed afterwards. Why not pass them to lm-eval directly:
    lm-eval 0.4.13 merges a group given as a dict into its tasks' configs, and names a group file
    given by path after its task list, so only indexed groups load correctly.
    """
    from lm_eval.tasks._index import TaskIndex

    with tempfile.TemporaryDirectory(prefix="mhc_eval_tasks_") as folder:
        for number, config in enumerate(configs):
            path = Path(folder) / f"{number:02d}_{config['group']}.yaml"
            path.write_text(yaml.dump(dict(config), Dumper=_SpecDumper, sort_keys=False), encoding="utf-8")
        entries = TaskIndex.build([Path(folder)])
        index = task_manager.task_index
        shadowed = {name: index[name] for name in entries if name in index}
        index.update(entries)
        try:
            yield [config["group"] for config in configs]
        finally:
            for name in entries:
                del index[name]
            index.update(shadowed)


@contextlib.contextmanager
def _quiet_custom_dataset_notice() -> Iterator[None]:
    """lm-eval logs a generic "custom kwargs can be passed to --metadata" warning for every task that
    uses `custom_dataset`; with 57 MMLU subjects it buries the useful output."""

    def keep(record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()

    task_logger = logging.getLogger("lm_eval.api.task")
    task_logger.addFilter(keep)
    try:
        yield
    finally:
        task_logger.removeFilter(keep)


def _make_lm(model: Any, tokenizer: Any, *, batch_size: int, device: str | None, trust_remote_code: bool):
    from lm_eval.api.model import LM
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, LM):
        return model
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(model, (str, os.PathLike)):
        return HFLM(
            pretrained=str(model),
            tokenizer=str(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer,
            batch_size=batch_size,
            device=device,
            trust_remote_code=trust_remote_code,
        )
    if tokenizer is None:
        raise ValueError("evaluate_model: pass the tokenizer together with an in-process model")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=trust_remote_code)
    # An in-process model stays on its device; HFLM only wraps it.
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _scores(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flatten lm-eval's ``{name: {"metric,filter": value}}`` into one row per (name, metric, filter);
    ``kind`` tells groups (aggregates) from tasks."""
    rows = []
    groups = results.get("groups", {})
    for name, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                {
                    "task": name,
                    "kind": "group" if name in groups else "task",
                    "metric": metric,
                    "filter": filter_name,
                    "value": value,
                    "stderr": stderr if isinstance(stderr, (int, float)) else None,
                    "n": results.get("n-samples", {}).get(name, {}).get("effective"),
                }
            )
    return rows


def evaluate_model(
    model: Any,
    tokenizer: Any = None,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    data_files: Mapping[str, str | Mapping[str | None, str]] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    max_gen_toks: int | None = None,
    skip_flagged_mmlu: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """Run the downstream suite with lm-eval on local data.

    Args:
        model: a checkpoint folder (or Hub id, if online), a ``transformers.PreTrainedModel`` already in
            memory (then ``tokenizer`` is required), or an ``lm_eval`` ``LM`` instance.
        tokenizer: a tokenizer object or path; default for a path ``model``: the model's own.
        tasks: see :func:`build_task_configs` (default: ``bbh``, ``gsm8k``, ``mmlu``).
        data_dir, data_files, skip_flagged_mmlu: see :func:`build_task_configs`.
        limit: evaluate the first ``limit`` documents of each task (a float < 1: that fraction).
        num_fewshot: override the tasks' few-shot counts (default: each task's own: BBH 3, GSM8K 8,
            MMLU 0).
        batch_size: lm-eval batch size.
        max_gen_toks: cap on generated tokens for generation tasks (lm-eval default otherwise; BBH CoT
            allows 1024).
        trust_remote_code: allow a checkpoint's own modeling code.
        device: for a path ``model`` (default: CUDA if available, else CPU).
        log_samples: include every prompt, response and per-document score under ``"samples"``.
        bootstrap_iters: lm-eval's bootstrap iterations for stderr of non-mean metrics (0 = skip).

    Returns:
        ``{"model", "settings", "scores": [one row per task/metric/filter], "lm_eval": lm-eval's own
        results (results, groups, configs, versions, n-shot, n-samples, ...), "samples"?}``
    """
    import lm_eval

    task_manager = get_task_manager()
    configs, folder = build_task_configs(
        tasks,
        data_dir=data_dir,
        data_files=data_files,
        skip_flagged_mmlu=skip_flagged_mmlu,
        task_manager=task_manager,
    )
    lm = _make_lm(model, tokenizer, batch_size=batch_size, device=device, trust_remote_code=trust_remote_code)
    with registered_task_configs(task_manager, configs) as names, _quiet_custom_dataset_notice():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=task_manager,
            num_fewshot=num_fewshot,
            limit=limit,
            gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
        )
    samples = results.pop("samples", None)
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
    else:  # in-process: the folder it was loaded from, if any
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    report = {
        "model": name,
        "settings": {
            "tasks": list(tasks.split(",") if isinstance(tasks, str) else tasks),
            "data_dir": str(folder) if folder else None,
            "data_files": {
                task: {split or "evaluation": str(path) for split, path in files.items()}
                if isinstance(files, Mapping)
                else str(files)
                for task, files in (data_files or {}).items()
            },
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "max_gen_toks": max_gen_toks,
            "skip_flagged_mmlu": skip_flagged_mmlu,
        },
        "scores": _scores(results),
        "lm_eval": results,
    }
    if log_samples:
        report["samples"] = samples
    return report


def format_markdown(report: Mapping[str, Any]) -> str:
    """lm-eval's own Markdown tables (tasks, then groups) for a report from :func:`evaluate_model`."""
    from lm_eval.utils import make_table

    results = report["lm_eval"]
    text = f"## {report['model']}\n\n" + make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def to_json(report: Mapping[str, Any]) -> str:
    """Serialise a report (lm-eval configs hold functions and numpy scalars: stringified)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(report, indent=2, default=handle_non_serializable, ensure_ascii=False)


# ----------------------------------------------------------------------------- command line


def _limit(value: str) -> int | float:
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0, got {value}")
    return int(number) if number >= 1 and number.is_integer() else number


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``transformers-mhc eval``."""
    parser = subparsers.add_parser(
        "eval",
        help="downstream suite (BBH, GSM8K, MMLU-Redux, ...) on local data with lm-eval",
        description=(
            "Evaluate a causal LM with the lm-eval harness on local data. Tasks: bbh (27 tasks, 3-shot CoT), "
            "bbh_direct (3-shot direct answer), gsm8k (8-shot CoT), mmlu (MMLU-Redux, 57 subjects, "
            "loglikelihood), any task inside them (e.g. mmlu_anatomy, bbh_cot_fewshot_navigate), or any other "
            "lm-eval task given a local file with --data-file (hellaswag, piqa, triviaqa, drop, "
            "hendrycks_math_algebra, ...; the file must have the Hub data set's columns)."
        ),
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (or Hub id when online)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument(
        "--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated (default: %(default)s)"
    )
    parser.add_argument(
        "--limit", type=_limit, default=None, help="first N documents per task (or a fraction < 1)"
    )
    parser.add_argument("--num-fewshot", type=int, default=None, help="override each task's few-shot count")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--max-gen-toks", type=int, default=None, help="cap on generated tokens (generation tasks)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"data folder (default: ${data.DATA_DIR_ENV} or ../shared/data when present)",
    )
    parser.add_argument(
        "--data-file",
        action="append",
        default=[],
        metavar="TASK[:SPLIT]=PATH",
        help="run lm-eval task TASK on a local file (.json/.jsonl/.csv/.parquet); without :SPLIT the file is "
        "the task's evaluation split; repeat for more tasks or splits",
    )
    parser.add_argument(
        "--output", default=None, help="results JSON (a Markdown table goes next to it as .md)"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own modeling code"
    )
    parser.add_argument(
        "--skip-flagged-mmlu",
        action="store_true",
        help="drop MMLU-Redux questions whose error_type is not 'ok'",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--log-samples", action="store_true", help="store every prompt and response in the JSON"
    )
    parser.add_argument("--bootstrap-iters", type=int, default=100_000)
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """``transformers-mhc eval``: run, print the Markdown table, write ``--output`` (+ ``.md``)."""
    if args.output and Path(args.output).suffix == ".md":
        print(
            "transformers-mhc eval: error: --output is the JSON file; the .md table is written next to it",
            file=sys.stderr,
        )
        return 2
    try:
        data_files: dict[str, dict[str | None, str]] = {}
        for spec in args.data_file:
            task, split, path = parse_data_file(spec)
            data_files.setdefault(task, {})[split] = path
        report = evaluate_model(
            args.model,
            args.tokenizer,
            args.tasks,
            data_dir=args.data_dir,
            data_files=data_files,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            max_gen_toks=args.max_gen_toks,
            skip_flagged_mmlu=args.skip_flagged_mmlu,
            trust_remote_code=args.trust_remote_code,
            device=args.device,
            log_samples=args.log_samples,
            bootstrap_iters=args.bootstrap_iters,
        )
    except (ValueError, data.DataDirError) as err:
        print(f"transformers-mhc eval: error: {err}", file=sys.stderr)
        return 2
    markdown = format_markdown(report)
    print(markdown)
    if args.output:
        write_atomic(args.output, to_json(report))
        write_atomic(Path(args.output).with_suffix(".md"), markdown)
        print(f"wrote {args.output} and {Path(args.output).with_suffix('.md')}")
    return 0
