"""The downstream suite on local data: the task folder (`transformers-mhc eval-tasks`) and
`transformers-mhc eval` / `evaluate_model` on top of it.

The reference for "same scores as lm-eval" is built here independently: lm-eval's own task YAML,
`include:`d by absolute path, with only the dataset fields pointed at the same local files.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from transformers_mhc.evaluation import data, local_tasks, suite  # noqa: E402
from transformers_mhc.evaluation.io_utils import write_atomic  # noqa: E402
from transformers_mhc.evaluation.local_tasks import read_task_yaml, write_task_folder  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
BBH_TASK = "sports_understanding"  # short prompts: keeps the CoT requests cheap on CPU
MMLU_SUBJECT = "anatomy"  # its CSV is ';'-separated, unlike most Redux files


def _metrics(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if "," in k}


def _redux_rows(path: Path) -> list[dict]:
    """Independent reader for a Redux CSV: delimiter from the header, utf-8 with replacement."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    delimiter = ";" if text.splitlines()[0].count(";") > text.splitlines()[0].count(",") else ","
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


# ----------------------------------------------------------------------------- no model needed


def _folder_tasks(folder: Path) -> dict[str, dict]:
    """The task and group YAMLs of a written folder, includes merged, by name."""
    configs = (read_task_yaml(path) for path in folder.glob("*.yaml"))
    return {cfg.get("group") or cfg["task"]: cfg for cfg in configs}


def _leaves(configs: dict[str, dict], name: str) -> list[str]:
    cfg = configs[name]
    return [leaf for member in cfg["task"] for leaf in _leaves(configs, member)] if "group" in cfg else [name]


def test_catalogue_lists_every_builtin_task():
    """BBH: all 27 tasks in both variants, in lm-eval's order; MMLU: the 57 subjects under lm-eval's 4
    categories, read from lm-eval's own files."""
    tasks, groups = local_tasks.catalogue()
    builtin_cot = read_task_yaml(LM_EVAL_TASKS / "bbh" / "cot_fewshot" / "_bbh_cot_fewshot.yaml")["task"]
    builtin_direct = read_task_yaml(LM_EVAL_TASKS / "bbh" / "fewshot" / "_bbh_fewshot.yaml")["task"]
    assert len(builtin_cot) == 27
    assert [tasks[t].builtin for t in local_tasks.leaf_tasks("local_bbh_cot_fewshot")] == builtin_cot
    assert [tasks[t].builtin for t in local_tasks.leaf_tasks("local_bbh_fewshot")] == builtin_direct
    for name in local_tasks.leaf_tasks("local_bbh_cot_fewshot") + local_tasks.leaf_tasks("local_bbh_fewshot"):
        subject = tasks[name].builtin.removeprefix("bbh_cot_fewshot_").removeprefix("bbh_fewshot_")
        assert tasks[name].source == f"bbh/{subject}.json" and name == f"local_{tasks[name].builtin}"

    ours = {
        category: {tasks[t].builtin for t in local_tasks.leaf_tasks(f"local_mmlu_redux_{category}")}
        for category in local_tasks.MMLU_CATEGORIES
    }
    builtin: dict[str, set[str]] = {}
    for path in (LM_EVAL_TASKS / "mmlu" / "default").glob("mmlu_*.yaml"):
        cfg = read_task_yaml(path)
        builtin.setdefault(cfg["tag"].removeprefix("mmlu_").removesuffix("_tasks"), set()).add(cfg["task"])
    assert ours == builtin
    assert len(local_tasks.leaf_tasks("local_mmlu_redux")) == 57
    assert local_tasks.leaf_tasks("local_gsm8k_cot") == ["local_gsm8k_cot"]
    assert tasks["local_gsm8k_cot"].builtin == "gsm8k_cot"


def test_written_folder_runs_lm_eval_tasks_on_every_local_file(data_dir, tmp_path):
    """Each task includes lm-eval's own YAML of its built-in task and changes only where the data comes
    from; every file it reads exists; groups list exactly the catalogue."""
    folder = tmp_path / "tasks"
    names = write_task_folder(folder, data_dir)
    assert names == ["local_bbh_cot_fewshot", "local_bbh_fewshot", "local_mmlu_redux", "local_gsm8k_cot"]
    configs = _folder_tasks(folder)
    leaves = [leaf for name in names for leaf in _leaves(configs, name)]
    assert len(leaves) == len(set(leaves)) == 27 + 27 + 57 + 1
    for name in names:
        assert _leaves(configs, name) == local_tasks.leaf_tasks(name)
    manager = local_tasks.builtin_task_manager()
    # `lm_eval --include_path` indexes lm-eval's own tasks too: none of ours may shadow one of them.
    assert not (set(configs) & set(manager.all_tasks))
    for leaf in leaves:
        builtin = local_tasks.catalogue()[0][leaf].builtin
        raw = yaml.safe_load((folder / f"{leaf}.yaml").read_text())
        assert Path(raw["include"]) == Path(manager.task_index[builtin].yaml_path)
        assert raw["tag"] is None  # not a member of lm-eval's own groups (e.g. `mmlu`)
        ours, theirs = configs[leaf], read_task_yaml(raw["include"])
        changed = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
        assert changed <= {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "fewshot_split"}
        assert ours["dataset_path"] == "json" and ours["dataset_name"] is None
        for path in ours["dataset_kwargs"]["data_files"].values():
            assert Path(path).is_absolute() and Path(path).is_file(), path
    assert configs["local_bbh_cot_fewshot_navigate"]["dataset_kwargs"] == {
        "data_files": {"test": str(data_dir.resolve() / "bbh" / "navigate.json")},
        "field": "examples",
    }
    assert configs["local_gsm8k_cot"]["dataset_kwargs"]["data_files"]["test"] == str(
        data_dir.resolve() / "gsm8k" / "test.jsonl"
    )
    assert configs["local_mmlu_redux"]["group_alias"] == "mmlu_redux"
    assert configs["local_mmlu_redux_social_sciences"]["group_alias"] == "social sciences"
    # Written only when complete: an existing folder is kept unless asked to replace it.
    marker = folder / "local_gsm8k_cot.yaml"
    before = marker.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_task_folder(folder, data_dir, tasks="gsm8k")
    assert marker.read_bytes() == before and len(list(folder.glob("*.yaml"))) == 112 + 7  # tasks + groups
    assert write_task_folder(folder, data_dir, tasks="gsm8k", overwrite=True) == ["local_gsm8k_cot"]
    assert sorted(p.name for p in folder.glob("*.yaml")) == ["local_gsm8k_cot.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks"]  # no staging folder left behind


def test_lm_eval_loads_the_folder_with_its_public_task_manager(data_dir, tmp_path):
    """TaskManager(include_path=...) indexes the folder alone (our tasks include lm-eval's files by
    path) and builds the tasks offline from the local files."""
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "tasks"
    write_task_folder(folder, data_dir, tasks="bbh_cot_fewshot_navigate,mmlu_anatomy,gsm8k")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert set(manager.all_subtasks) == {
        "local_bbh_cot_fewshot_navigate",
        "local_mmlu_anatomy",
        "local_gsm8k_cot",
    }
    loaded = manager.load(["local_bbh_cot_fewshot_navigate", "local_mmlu_anatomy"])
    navigate = loaded["tasks"]["local_bbh_cot_fewshot_navigate"]
    local_docs = json.loads((data_dir / "bbh" / "navigate.json").read_text())["examples"]
    assert list(navigate.test_docs()) == local_docs
    anatomy = loaded["tasks"]["local_mmlu_anatomy"]
    assert [d["question"] for d in anatomy.test_docs()] == [
        r["question"] for r in _redux_rows(data_dir / "mmlu_redux" / f"mmlu_{MMLU_SUBJECT}.csv")
    ]


def test_mmlu_redux_reader_handles_every_file_format(data_dir):
    """Each Redux file reads to 100 well-formed questions, whatever its delimiter or encoding."""
    paths = sorted((data_dir / "mmlu_redux").glob("mmlu_*.csv"))
    assert len(paths) == 57
    for path in paths:
        docs = data.read_mmlu_redux_csv(path)
        reference = _redux_rows(path)
        assert len(docs) == len(reference) == 100, path.name
        for doc, row in zip(docs, reference):
            assert doc["question"] == row["question"]
            assert doc["choices"] == ast.literal_eval(row["choices"]) and len(doc["choices"]) == 4
            assert doc["answer"] == int(row["answer"]) and doc["subject"] == path.stem.removeprefix("mmlu_")
            assert (doc["error_type"] == "ok") == (row["error_type"].strip().lower() == "ok")


def test_skip_flagged_drops_exactly_the_disputed_questions(data_dir, tmp_path):
    path = data_dir / "mmlu_redux" / "mmlu_virology.csv"  # the subject with the most flagged rows
    ok = [row["question"] for row in _redux_rows(path) if row["error_type"].strip().lower() == "ok"]

    def questions(skip: bool) -> list[str]:
        folder = tmp_path / f"skip_{skip}"
        write_task_folder(folder, data_dir, tasks="mmlu_virology", skip_flagged_mmlu=skip)
        (converted,) = _folder_tasks(folder)["local_mmlu_virology"]["dataset_kwargs"]["data_files"].values()
        return [json.loads(line)["question"] for line in Path(converted).read_text().splitlines()]

    assert questions(skip=True) == ok
    assert len(questions(skip=False)) == 100 > len(ok)


def test_missing_data_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "_REPO_ROOT", tmp_path / "repo")
    assert data.default_data_dir() is None
    with pytest.raises(data.DataDirError, match="--data-dir"):
        data.resolve_data_dir()
    with pytest.raises(data.DataDirError, match="is not a folder"):
        data.resolve_data_dir(tmp_path / "nowhere")
    with pytest.raises(data.DataDirError, match="--data-dir"):
        write_task_folder(tmp_path / "tasks", tasks="mmlu")
    assert not (tmp_path / "tasks").exists()
    # Tasks given their own files need no data folder.
    piqa = tmp_path / "piqa.jsonl"
    piqa.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 0}) + "\n")
    assert write_task_folder(tmp_path / "tasks", tasks="piqa", data_files={"piqa": piqa}) == ["local_piqa"]
    config = read_task_yaml(tmp_path / "tasks" / "local_piqa.yaml")
    assert config["dataset_kwargs"] == {"data_files": {"validation": str(piqa)}}
    with pytest.raises(data.DataDirError, match="file not found"):
        write_task_folder(tmp_path / "other", tasks="piqa", data_files={"piqa": tmp_path / "nowhere.jsonl"})
    # The environment variable and ../shared/data next to the working directory are found.
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert data.resolve_data_dir() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.resolve_data_dir() == tmp_path.resolve()


def test_task_names_resolve_and_bad_ones_are_explained(data_dir, tmp_path):
    resolve = local_tasks.resolve_tasks
    assert resolve(["mmlu_anatomy", "bbh_cot_fewshot_navigate", "mmlu_virology", "gsm8k"]) == [
        "local_mmlu_anatomy",
        "local_bbh_cot_fewshot_navigate",
        "local_mmlu_virology",
        "local_gsm8k_cot",
    ]
    assert resolve("bbh, bbh_direct,mmlu_redux,gsm8k_cot,local_mmlu_anatomy") == [
        "local_bbh_cot_fewshot",
        "local_bbh_fewshot",
        "local_mmlu_redux",
        "local_gsm8k_cot",
    ]
    # A task or subgroup already inside a requested group is not run twice (lm-eval would refuse).
    assert resolve("mmlu_anatomy,local_mmlu_redux_stem,mmlu,bbh,bbh_cot") == [
        "local_mmlu_redux",
        "local_bbh_cot_fewshot",
    ]
    assert resolve("hellaswag,mmlu", data_files=["hellaswag"]) == ["local_hellaswag", "local_mmlu_redux"]
    for names, files in (
        (["local_bbh_fewshot", "local_mmlu_anatomy"], []),
        (["local_hellaswag"], ["hellaswag"]),
    ):
        assert resolve(names, data_files=files) == names  # resolved names stay as they are
    with pytest.raises(ValueError, match="unknown task 'hellaswag'.*--data-file hellaswag=PATH"):
        resolve("hellaswag")
    with pytest.raises(ValueError, match="no tasks"):
        resolve(" , ")
    with pytest.raises(ValueError, match="not listed in --tasks"):
        write_task_folder(tmp_path / "a", data_dir, tasks="mmlu", data_files={"piqa": "x.jsonl"})
    with pytest.raises(ValueError, match="a group or tag"):
        write_task_folder(tmp_path / "b", data_dir, tasks="mmlu", data_files={"mmlu": "x.csv"})
    with pytest.raises(ValueError, match="not an lm-eval task"):
        write_task_folder(tmp_path / "c", data_dir, tasks="nonsense", data_files={"nonsense": "x.csv"})
    with pytest.raises(ValueError, match="evaluation split 'validation'"):
        write_task_folder(tmp_path / "d", tasks="piqa", data_files={"piqa": {"train": "x.jsonl"}})
    assert not any(tmp_path.iterdir())  # nothing written on failure
    assert local_tasks.parse_data_file("hellaswag=/d/h.jsonl") == ("hellaswag", None, "/d/h.jsonl")
    assert local_tasks.parse_data_file("triviaqa:train=t.json") == ("triviaqa", "train", "t.json")
    with pytest.raises(ValueError, match="TASK=PATH"):
        local_tasks.parse_data_file("hellaswag")


def test_eval_tasks_command_writes_the_folder_and_keeps_an_existing_one(data_dir, tmp_path, capsys):
    output = tmp_path / "tasks"
    argv = [
        "eval-tasks",
        "--data-dir",
        str(data_dir),
        "--output",
        str(output),
        "--tasks",
        "mmlu_anatomy,gsm8k",
    ]
    args = _eval_parser().parse_args(argv)
    assert args.func(args) == 0
    assert sorted(p.name for p in output.glob("*.yaml")) == [
        "local_gsm8k_cot.yaml",
        "local_mmlu_anatomy.yaml",
    ]
    assert f"--include_path {output} --tasks local_mmlu_anatomy,local_gsm8k_cot" in capsys.readouterr().out
    again = _eval_parser().parse_args([*argv[:-1], "bbh"])
    assert again.func(again) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in output.glob("*.yaml")) == [
        "local_gsm8k_cot.yaml",
        "local_mmlu_anatomy.yaml",
    ]
    bad = _eval_parser().parse_args(["eval-tasks", "--output", str(tmp_path / "x"), "--tasks", "nonsense"])
    assert bad.func(bad) == 2
    assert "unknown task 'nonsense'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_write_atomic_replaces_whole_files_only(tmp_path):
    target = tmp_path / "out" / "results.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second"
    with pytest.raises(TypeError):
        write_atomic(target, 123)  # fails mid-write: the old file stays, no temporary file is left
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]


# ----------------------------------------------------------------------------- with stories260k


def _reference_yaml(folder: Path, name: str, builtin: Path, **dataset) -> str:
    """lm-eval's own task, untouched except for where its data comes from."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"include": str(builtin), "task": name, "dataset_name": None, **dataset}))
    return str(path)


def test_scores_equal_lm_eval_builtin_tasks_on_the_same_local_data(stories260k_path, data_dir, tmp_path):
    limit, max_gen_toks = 3, 24
    # Redux CSV -> the column layout of the Hub's cais/mmlu, read independently of our loader.
    csv_path = data_dir / "mmlu_redux" / f"mmlu_{MMLU_SUBJECT}.csv"
    jsonl = tmp_path / f"{MMLU_SUBJECT}.jsonl"
    with jsonl.open("w") as handle:
        for row in _redux_rows(csv_path):
            doc = {"question": row["question"], "subject": MMLU_SUBJECT, "answer": int(row["answer"])}
            handle.write(json.dumps({**doc, "choices": ast.literal_eval(row["choices"])}) + "\n")
    bbh_file = {"data_files": {"test": str(data_dir / "bbh" / f"{BBH_TASK}.json")}, "field": "examples"}
    pairs = {  # our task -> the reference built from lm-eval's YAML
        f"bbh_cot_fewshot_{BBH_TASK}": _reference_yaml(
            tmp_path,
            "ref_bbh_cot",
            LM_EVAL_TASKS / "bbh" / "cot_fewshot" / f"{BBH_TASK}.yaml",
            dataset_path="json",
            dataset_kwargs=bbh_file,
        ),
        f"bbh_fewshot_{BBH_TASK}": _reference_yaml(
            tmp_path,
            "ref_bbh_direct",
            LM_EVAL_TASKS / "bbh" / "fewshot" / f"{BBH_TASK}.yaml",
            dataset_path="json",
            dataset_kwargs=bbh_file,
        ),
        "gsm8k_cot": _reference_yaml(
            tmp_path,
            "ref_gsm8k",
            LM_EVAL_TASKS / "gsm8k" / "gsm8k-cot.yaml",
            dataset_path="json",
            dataset_kwargs={"data_files": {"test": str(data_dir / "gsm8k" / "test.jsonl")}},
        ),
        f"mmlu_{MMLU_SUBJECT}": _reference_yaml(
            tmp_path,
            "ref_mmlu",
            LM_EVAL_TASKS / "mmlu" / "default" / f"mmlu_{MMLU_SUBJECT}.yaml",
            dataset_path="json",
            # cais/mmlu's 5-shot dev split does not exist locally; 0-shot never reads it.
            dataset_kwargs={"data_files": {"test": str(jsonl), "dev": str(jsonl)}},
        ),
    }
    ours = suite.evaluate_model(
        stories260k_path,
        tasks=list(pairs),
        data_dir=data_dir,
        limit=limit,
        max_gen_toks=max_gen_toks,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )
    reference = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(stories260k_path), device="cpu", batch_size=1),
        tasks=list(pairs.values()),
        task_manager=TaskManager(),
        limit=limit,
        gen_kwargs={"max_gen_toks": max_gen_toks},
        log_samples=True,
        bootstrap_iters=0,
    )
    for builtin, ref_yaml in pairs.items():
        ref, task = Path(ref_yaml).stem, f"local_{builtin}"  # our tasks: `local_` + lm-eval's name
        assert _metrics(ours["lm_eval"]["results"][task]) == _metrics(reference["results"][ref]), task
        assert ours["lm_eval"]["n-samples"][task] == reference["n-samples"][ref]
        mine, theirs = ours["samples"][task], reference["samples"][ref]
        assert (
            len(mine) == len(theirs) == limit * len({s["filter"] for s in theirs})
        )  # one per doc and filter
        for a, b in zip(mine, theirs):
            assert {k: a["doc"][k] for k in b["doc"]} == b["doc"]  # ours may add Redux's annotation
            assert a["arguments"] == b["arguments"]  # identical prompts and generation settings
            assert a["resps"] == b["resps"] and a["filtered_resps"] == b["filtered_resps"]
            assert a["target"] == b["target"] and a["filter"] == b["filter"]
    # Sanity: the prompts really are lm-eval's few-shot ones, and the flat score rows match.
    first_cot = ours["samples"][f"local_bbh_cot_fewshot_{BBH_TASK}"][0]["arguments"][0][0]
    assert first_cot.count("Let's think step by step.") == 4
    row = next(r for r in ours["scores"] if r["task"] == f"local_mmlu_{MMLU_SUBJECT}")
    assert row["value"] == reference["results"]["ref_mmlu"]["acc,none"] and row["n"] == limit


def test_limited_runs_of_bbh_gsm8k_mmlu(stories260k_path, data_dir, capsys, caplog):
    """The whole suite, one document per task; the run is announced with its request count and
    estimate, and lm-eval's per-request truncation notice appears once."""
    caplog.set_level(logging.WARNING)
    report = suite.evaluate_model(
        stories260k_path,
        tasks="bbh,gsm8k,mmlu",
        data_dir=data_dir,
        limit=1,
        max_gen_toks=4,
        batch_size=8,
        bootstrap_iters=0,
    )
    results = report["lm_eval"]
    tasks = {r["task"] for r in report["scores"] if r["kind"] == "task"}
    assert len([t for t in tasks if t.startswith("local_bbh_cot_fewshot_")]) == 27
    assert len([t for t in tasks if t.startswith("local_mmlu_")]) == 57
    assert "local_gsm8k_cot" in tasks and len(tasks) == 27 + 57 + 1
    assert all(results["n-samples"][t]["effective"] == 1 for t in tasks)
    groups = results["groups"]
    assert 0.0 <= groups["local_bbh_cot_fewshot"]["exact_match,get-answer"] <= 1.0
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(
        results["results"]["local_gsm8k_cot"]
    )
    mmlu = groups["local_mmlu_redux"]["acc,none"]
    per_subject = [results["results"][t]["acc,none"] for t in tasks if t.startswith("local_mmlu_")]
    assert mmlu == pytest.approx(sum(per_subject) / 57)  # one question each: a plain mean
    assert report["settings"]["num_fewshot"] is None
    assert (
        results["n-shot"]["local_bbh_cot_fewshot_navigate"] == 3 and results["n-shot"]["local_gsm8k_cot"] == 8
    )
    markdown = suite.format_markdown(report)
    assert "local_bbh_cot_fewshot" in markdown and "mmlu_redux" in markdown and "gsm8k_cot" in markdown

    # 57 subjects x 4 choices, 27 BBH + 1 GSM8K generations: what lm-eval ran, counted before it ran.
    plan = report["plan"]
    assert plan["requests"] == {"loglikelihood": 57 * 4, "generate_until": 27 + 1}
    assert plan["max_new_tokens"] == 28 * 4 and plan["forward_passes"] <= 57 * 4
    assert 0 < plan["estimated_s"] <= plan["estimated_max_s"] and plan["elapsed_s"] > 0
    assert plan["prefill_tokens_per_s"] > 0 and plan["decode_tokens_per_s"] > 0
    err = capsys.readouterr().err
    assert "lm-eval: 256 requests (228 loglikelihood, 28 generate_until)" in err
    assert "estimated time:" in err and "lm-eval: finished in" in err
    truncated = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("Left truncation applied")
    ]
    assert len(truncated) == 1 and "said once per run" in truncated[0]
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("left truncation of")]
    assert int(summary.split(":")[-1].split()[0]) > 1  # the BBH CoT prompts exceed 2048 - 4 tokens


def test_in_process_model_scores_like_its_checkpoint(stories260k_path, data_dir):
    """The hook for comparing converted models: `evaluate_model(model, tokenizer, tasks, ...)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(data_dir=data_dir, limit=2, max_gen_toks=8, log_samples=True, bootstrap_iters=0)
    tasks = f"mmlu_{MMLU_SUBJECT},gsm8k_cot"
    from_path = suite.evaluate_model(stories260k_path, tasks=tasks, device="cpu", **kwargs)
    model = AutoModelForCausalLM.from_pretrained(stories260k_path)
    tokenizer = AutoTokenizer.from_pretrained(stories260k_path)
    in_memory = suite.evaluate_model(model, tokenizer, tasks, **kwargs)
    assert in_memory["scores"] == from_path["scores"]
    for task in ("local_gsm8k_cot", f"local_mmlu_{MMLU_SUBJECT}"):
        assert [s["resps"] for s in in_memory["samples"][task]] == [
            s["resps"] for s in from_path["samples"][task]
        ]
    with pytest.raises(ValueError, match="tokenizer"):
        suite.evaluate_model(model, None, tasks, **kwargs)


def test_trust_remote_code_checkpoint(stories260k_path, data_dir, tmp_path):
    """A checkpoint that carries its own modeling code loads only with trust_remote_code, and scores
    exactly like the same weights loaded as a plain Llama."""
    checkpoint = tmp_path / "remote_code_llama"
    checkpoint.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(stories260k_path / name, checkpoint / name)
    config = json.loads((stories260k_path / "config.json").read_text())
    config.update(
        model_type="remote_llama_test",
        architectures=["RemoteLlamaForCausalLM"],
        auto_map={
            "AutoConfig": "modeling_remote_llama.RemoteLlamaConfig",
            "AutoModelForCausalLM": "modeling_remote_llama.RemoteLlamaForCausalLM",
        },
    )
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "modeling_remote_llama.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class RemoteLlamaConfig(LlamaConfig):\n    model_type = 'remote_llama_test'\n\n\n"
        "class RemoteLlamaForCausalLM(LlamaForCausalLM):\n    config_class = RemoteLlamaConfig\n"
    )
    kwargs = dict(
        tasks=f"mmlu_{MMLU_SUBJECT}", data_dir=data_dir, limit=4, log_samples=True, bootstrap_iters=0
    )
    with pytest.raises(ValueError, match="trust_remote_code"):
        suite.evaluate_model(checkpoint, device="cpu", **kwargs)
    remote = suite.evaluate_model(checkpoint, device="cpu", trust_remote_code=True, **kwargs)
    plain = suite.evaluate_model(stories260k_path, device="cpu", **kwargs)
    task = f"local_mmlu_{MMLU_SUBJECT}"
    assert remote["lm_eval"]["results"][task] == plain["lm_eval"]["results"][task]
    assert [s["resps"] for s in remote["samples"][task]] == [s["resps"] for s in plain["samples"][task]]


def test_other_suite_members_run_from_a_local_file(stories260k_path, tmp_path):
    """HellaSwag (like PIQA, TriviaQA, DROP, MATH) runs lm-eval's task on a user's local file; with
    no training split given, few-shot examples come from the same file but never the question itself."""
    rows = [
        ("Baking", "A man puts flour in a bowl.", "he", ["adds eggs.", "jumps.", "sings.", "sleeps."], "0"),
        (
            "Running",
            "A girl ties her shoes.",
            "she",
            ["eats.", "runs down the road.", "reads.", "naps."],
            "1",
        ),
        ("Swimming", "A boy stands at the pool.", "he", ["bakes.", "drives.", "dives in.", "writes."], "2"),
    ]
    path = tmp_path / "hellaswag_validation.jsonl"
    with path.open("w") as handle:
        for label, ctx_a, ctx_b, endings, gold in rows:
            doc = {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}"}
            handle.write(json.dumps({**doc, "endings": endings, "label": gold}) + "\n")
    report = suite.evaluate_model(
        stories260k_path,
        tasks="hellaswag",
        data_files={"hellaswag": path},
        num_fewshot=1,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )
    results = report["lm_eval"]["results"]["local_hellaswag"]
    assert {"acc,none", "acc_norm,none"} <= set(results)
    assert report["lm_eval"]["n-samples"]["local_hellaswag"]["effective"] == 3
    for sample in report["samples"]["local_hellaswag"]:
        context = sample["arguments"][0][0]
        assert context.count(sample["doc"]["activity_label"] + ":") == 1  # its own example is not a shot
        assert context.count(":") == 2  # one shot + the question
    assert report["settings"]["data_dir"] is None


def test_lm_eval_truncation_notices_are_said_once(stories260k_path, caplog):
    """Guards what :func:`progress.notices_once` relies on in lm-eval (its HFLM logger and the wording of
    its two per-request truncation notices): if upstream changes either, this fails."""
    from lm_eval.api.instance import Instance

    from transformers_mhc.evaluation import progress

    caplog.set_level(logging.WARNING)
    lm = HFLM(pretrained=str(stories260k_path), device="cpu", batch_size=1, max_length=16)
    long_text = "Once upon a time there was a little girl who liked to play in the park. " * 3
    requests = [
        Instance("loglikelihood", {}, (long_text + str(i), " and then she went home."), idx=0)
        for i in range(3)
    ]
    with progress.notices_once() as counts:
        for _ in range(3):
            lm.tok_batch_encode([long_text], left_truncate_len=8)
        lm.loglikelihood(requests, disable_tqdm=True)
    messages = [r.getMessage() for r in caplog.records if r.name == progress.HFLM_LOGGER]
    for prefix in progress.REPEATED_NOTICES:
        assert counts[prefix] == 3, prefix
        assert len([m for m in messages if m.startswith(prefix)]) == 1, prefix
    summaries = [r.getMessage() for r in caplog.records if r.name == progress.__name__]
    assert summaries == [f"{text}: 3 requests in all" for text in progress.REPEATED_NOTICES.values()]
    # Outside the block lm-eval's logger is left as it was.
    caplog.clear()
    lm.tok_batch_encode([long_text], left_truncate_len=8)
    lm.tok_batch_encode([long_text], left_truncate_len=8)
    assert len([r for r in caplog.records if r.name == progress.HFLM_LOGGER]) == 2


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transformers-mhc")
    suite.add_subparser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_writes_json_and_markdown_and_keeps_old_results_on_failure(
    stories260k_path, data_dir, tmp_path, capsys
):
    output = tmp_path / "out" / "results.json"
    argv = ["eval", "--model", str(stories260k_path), "--tasks", f"mmlu_{MMLU_SUBJECT}", "--limit", "200"]
    argv += [
        "--data-dir",
        str(data_dir),
        "--skip-flagged-mmlu",
        "--output",
        str(output),
        "--bootstrap-iters",
        "0",
    ]
    args = _eval_parser().parse_args(argv)
    assert args.func(args) == 0
    report = json.loads(output.read_text())
    ok_rows = [
        r
        for r in _redux_rows(data_dir / "mmlu_redux" / f"mmlu_{MMLU_SUBJECT}.csv")
        if r["error_type"].strip().lower() == "ok"
    ]
    assert report["lm_eval"]["n-samples"][f"local_mmlu_{MMLU_SUBJECT}"] == {
        "original": len(ok_rows),
        "effective": len(ok_rows),
    }
    assert report["settings"]["skip_flagged_mmlu"] is True and report["settings"]["limit"] == 200
    assert any(r["task"] == f"local_mmlu_{MMLU_SUBJECT}" and r["metric"] == "acc" for r in report["scores"])
    markdown = output.with_suffix(".md").read_text()
    assert "anatomy" in markdown and markdown in capsys.readouterr().out
    assert sorted(p.name for p in output.parent.iterdir()) == ["results.json", "results.md"]

    before = output.read_bytes()
    bad = _eval_parser().parse_args(
        ["eval", "--model", str(stories260k_path), "--tasks", "nonsense", "--output", str(output)]
    )
    assert bad.func(bad) == 2
    assert "unknown task 'nonsense'" in capsys.readouterr().err
    assert output.read_bytes() == before
    as_md = _eval_parser().parse_args(["eval", "--model", "m", "--output", str(tmp_path / "r.md")])
    assert as_md.func(as_md) == 2
