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
"""The downstream suite (BBH, GSM8K, MMLU-Redux, ...) on local data: a thin convenience over lm-eval.

:func:`evaluate_model` (command line: ``transformers-mhc eval``) does what a user of lm-eval's own
command line does, in one call: it writes the task folder of :mod:`.local_tasks` for the data folder
(``transformers-mhc eval-tasks``), loads it with ``TaskManager(include_path=...)`` and runs
``lm_eval.simple_evaluate``; prompts, filters and metrics are lm-eval's own, so the scores are those of
``lm_eval --include_path FOLDER --tasks ...``. On top: the number of requests and an estimated time are
printed before the model starts (:mod:`.progress`), lm-eval's tqdm bars show the progress, and lm-eval's
per-request truncation notice is shown once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers_mhc.evaluation import data, local_tasks
from transformers_mhc.evaluation.io_utils import write_atomic
from transformers_mhc.evaluation.local_tasks import DEFAULT_TASKS


def _make_lm(model: Any, tokenizer: Any, *, batch_size: int, device: str | None, trust_remote_code: bool):
    """An lm-eval ``LM``: ``model`` itself if it is one, else lm-eval's ``HFLM`` (with the run plan)."""
    from lm_eval.api.model import LM

    from transformers_mhc.evaluation.progress import planned_hflm

    if isinstance(model, LM):
        return model
    hflm = planned_hflm()
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(model, (str, os.PathLike)):
        return hflm(
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
    return hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


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
    data_files: Mapping[str, str | os.PathLike[str] | Mapping[str | None, str]] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    max_gen_toks: int | None = None,
    skip_flagged_mmlu: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the downstream suite with lm-eval on local data.

    Args:
        model: a checkpoint folder (or Hub id, if online), a ``transformers.PreTrainedModel`` already in
            memory (then ``tokenizer`` is required), or an ``lm_eval`` ``LM`` instance (run as is: no
            estimate).
        tokenizer: a tokenizer object or path; default for a path ``model``: the model's own.
        tasks: names as for :func:`.local_tasks.resolve_tasks`: ``bbh`` (27 tasks, 3-shot CoT),
            ``bbh_direct``, ``gsm8k`` (8-shot CoT), ``mmlu`` (MMLU-Redux, 57 subjects), a task inside
            them (``mmlu_anatomy``, ``bbh_cot_fewshot_navigate``) or a task given in ``data_files``.
            Results are keyed by lm-eval's names in the folder: ``local_`` + the built-in name.
        data_dir: the data folder; default: see :func:`.data.resolve_data_dir`.
        data_files: other lm-eval tasks on local files: task -> path of its evaluation split, or task ->
            {split (``None`` = evaluation split) -> path}; they run as ``local_<task>``.
        skip_flagged_mmlu: drop MMLU-Redux questions whose ``error_type`` is not ``ok``.
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
        verbose: print the number of requests and the estimated time (stderr) before the model runs.

    Returns:
        ``{"model", "settings", "scores": [one row per task/metric/filter], "lm_eval": lm-eval's own
        results (results, groups, configs, versions, n-shot, n-samples, ...), "plan": requests, warm-up
        speed, estimated and elapsed seconds (``None`` for an ``LM`` instance), "samples"?}``
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from transformers_mhc.evaluation.progress import format_seconds, notices_once

    files = {
        task: ({None: spec} if isinstance(spec, (str, os.PathLike)) else dict(spec))
        for task, spec in (data_files or {}).items()
    }
    names = local_tasks.resolve_tasks(tasks, files)  # bad names fail before the model loads
    needs_data = any(name.removeprefix(local_tasks.PREFIX) not in files for name in names)
    folder = data.resolve_data_dir(data_dir) if needs_data or data_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="mhc_eval_tasks_") as task_dir:
        local_tasks.write_task_folder(
            task_dir, folder, tasks=names, data_files=files, skip_flagged_mmlu=skip_flagged_mmlu
        )
        lm = _make_lm(
            model, tokenizer, batch_size=batch_size, device=device, trust_remote_code=trust_remote_code
        )
        # Our folder holds every task it runs (each includes lm-eval's file by path): no need to index
        # lm-eval's thousands of built-in tasks again.
        manager = TaskManager(include_path=task_dir, include_defaults=False)
        # Build the tasks once, here, so that the plan sees the very Task objects lm-eval runs.
        top_level, leaves = [], []
        for name in names:
            loaded = manager.load([name])
            top_level.append(loaded["groups"][name] if name in loaded["groups"] else loaded["tasks"][name])
            leaves += loaded["tasks"].values()
        planned = hasattr(lm, "plan_for")
        if planned:
            lm.plan_for(leaves, verbose=verbose)
        with notices_once():
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=top_level,
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
                log_samples=log_samples,
                bootstrap_iters=bootstrap_iters,
            )
    plan = None
    if planned and lm.mhc_plan is not None:
        plan = {**lm.mhc_plan.as_dict(), "elapsed_s": time.perf_counter() - lm.mhc_started}
        if verbose:
            low, high = plan["estimated_s"], plan["estimated_max_s"]
            said = ""
            if low is not None:
                said = f" (estimated {format_seconds(low)}"
                said += f" to {format_seconds(high)})" if plan["max_new_tokens"] else ")"
            print(
                f"lm-eval: finished in {format_seconds(plan['elapsed_s'])}{said}", file=sys.stderr, flush=True
            )
    samples = results.pop("samples", None)
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
    else:  # in-process: the folder it was loaded from, if any
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    report = {
        "model": name,
        "settings": {
            "tasks": local_tasks.split_names(tasks),
            "data_dir": str(folder) if folder else None,
            "data_files": {
                task: {split or "evaluation": str(path) for split, path in task_files.items()}
                for task, task_files in files.items()
            },
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "max_gen_toks": max_gen_toks,
            "skip_flagged_mmlu": skip_flagged_mmlu,
        },
        "scores": _scores(results),
        "lm_eval": results,
        "plan": plan,
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
    """Register ``transformers-mhc eval`` and ``transformers-mhc eval-tasks`` (the folder it runs)."""
    local_tasks.add_subparser(subparsers)
    parser = subparsers.add_parser(
        "eval",
        help="downstream suite (BBH, GSM8K, MMLU-Redux, ...) on local data with lm-eval",
        description=(
            "Evaluate a causal LM with the lm-eval harness on local data. Tasks: bbh (27 tasks, 3-shot CoT), "
            "bbh_direct (3-shot direct answer), gsm8k (8-shot CoT), mmlu (MMLU-Redux, 57 subjects, "
            "loglikelihood), any task inside them (e.g. mmlu_anatomy, bbh_cot_fewshot_navigate), or any other "
            "lm-eval task given a local file with --data-file (hellaswag, piqa, triviaqa, drop, "
            "hendrycks_math_algebra, ...; the file must have the Hub data set's columns). Results are keyed "
            "local_ + lm-eval's task name. Prints the number of requests and an estimated time before it starts. "
            "Same as `transformers-mhc eval-tasks` + `lm_eval --include_path`."
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
    local_tasks.add_data_arguments(parser)
    parser.add_argument(
        "--output", default=None, help="results JSON (a Markdown table goes next to it as .md)"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own modeling code"
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
        data_files = local_tasks.data_files_from_args(args.data_file)
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
