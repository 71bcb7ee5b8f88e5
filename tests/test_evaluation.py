"""The downstream suite (`transformers-mhc eval` / `evaluate_model`) on local data.

The reference for "same scores as lm-eval" is built here independently: lm-eval's own task YAML,
`include:`d by absolute path, with only the dataset fields pointed at the same local files.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from transformers_mhc.evaluation import data, suite  # noqa: E402
from transformers_mhc.evaluation.io_utils import write_atomic  # noqa: E402

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


def test_shipped_groups_list_every_builtin_task():
    """BBH: all 27 tasks in both variants; MMLU: the 57 subjects under lm-eval's 4 categories."""

    def load(path: Path) -> dict:
        return yaml.load(path.read_text(), suite._IgnoreTagsLoader)

    cot = load(suite.TASKS_DIR / "bbh" / "local_bbh_cot_fewshot.yaml")
    direct = load(suite.TASKS_DIR / "bbh" / "local_bbh_fewshot.yaml")
    builtin_cot = load(LM_EVAL_TASKS / "bbh" / "cot_fewshot" / "_bbh_cot_fewshot.yaml")["task"]
    builtin_direct = load(LM_EVAL_TASKS / "bbh" / "fewshot" / "_bbh_fewshot.yaml")["task"]
    assert len(builtin_cot) == 27
    assert suite._leaf_names(cot) == builtin_cot
    assert suite._leaf_names(direct) == builtin_direct
    for item in cot["task"] + direct["task"]:
        subject = item["task"].removeprefix("bbh_cot_fewshot_").removeprefix("bbh_fewshot_")
        assert item["dataset_kwargs"]["local_files"] == {"test": f"bbh/{subject}.json"}

    mmlu = load(suite.TASKS_DIR / "mmlu_redux" / "local_mmlu_redux.yaml")
    ours = {sub["group"]: set(suite._leaf_names(sub)) for sub in mmlu["task"]}
    builtin: dict[str, set[str]] = {}
    for path in (LM_EVAL_TASKS / "mmlu" / "default").glob("mmlu_*.yaml"):
        cfg = load(path)
        builtin.setdefault(cfg["tag"].removeprefix("mmlu_").removesuffix("_tasks"), set()).add(cfg["task"])
    assert ours == builtin
    assert sum(map(len, ours.values())) == 57
    gsm8k = load(suite.TASKS_DIR / "gsm8k" / "local_gsm8k_cot.yaml")
    assert suite._leaf_names(gsm8k) == ["gsm8k_cot"]


def test_every_data_file_the_tasks_read_exists(data_dir):
    manager = suite.get_task_manager()
    configs, folder = suite.build_task_configs(
        "bbh,bbh_direct,gsm8k,mmlu", data_dir=data_dir, task_manager=manager
    )
    assert folder == data_dir.resolve()
    files = []
    for config in configs:
        for item in config["task"]:
            for leaf in item["task"] if "group" in item else [item]:
                kwargs = leaf["dataset_kwargs"]
                assert kwargs["local_data_dir"] == str(folder)
                files += kwargs.get("local_files", {}).values()
                if "mmlu_redux_subject" in kwargs:
                    files.append(f"mmlu_redux/mmlu_{kwargs['mmlu_redux_subject']}.csv")
    assert len(files) == 27 + 27 + 1 + 57
    assert [f for f in files if not (folder / f).is_file()] == []


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


def test_skip_flagged_drops_exactly_the_disputed_questions(data_dir):
    path = data_dir / "mmlu_redux" / "mmlu_virology.csv"  # the subject with the most flagged rows
    ok = [row["question"] for row in _redux_rows(path) if row["error_type"].strip().lower() == "ok"]
    kept = data.load_mmlu_redux(
        mmlu_redux_subject="virology", data_dir=str(data_dir), mmlu_redux_skip_flagged=True
    )
    everything = data.load_mmlu_redux(mmlu_redux_subject="virology", data_dir=str(data_dir))
    assert kept["test"]["question"] == ok
    assert len(everything["test"]) == 100 > len(ok)
    # The lm_eval --metadata spelling is honoured too, and the per-run setting wins over it.
    via_metadata = data.load_mmlu_redux(
        mmlu_redux_subject="virology", data_dir=str(data_dir), skip_flagged_mmlu=True
    )
    assert len(via_metadata["test"]) == len(ok)
    overridden = data.load_mmlu_redux(
        mmlu_redux_subject="virology",
        data_dir=str(data_dir),
        skip_flagged_mmlu=True,
        mmlu_redux_skip_flagged=False,
    )
    assert len(overridden["test"]) == 100


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
        suite.build_task_configs("mmlu", task_manager=suite.get_task_manager())
    # Tasks given their own files need no data folder.
    configs, folder = suite.build_task_configs(
        "piqa", data_files={"piqa": tmp_path / "piqa.jsonl"}, task_manager=suite.get_task_manager()
    )
    assert folder is None and configs[0]["task"][0]["task"] == "piqa"
    # The environment variable and ../shared/data next to the working directory are found.
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert data.resolve_data_dir() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.resolve_data_dir() == tmp_path.resolve()


def test_task_names_resolve_and_bad_ones_are_explained(data_dir):
    manager = suite.get_task_manager()
    configs, _ = suite.build_task_configs(
        ["mmlu_anatomy", "bbh_cot_fewshot_navigate", "mmlu_virology", "gsm8k"],
        data_dir=data_dir,
        task_manager=manager,
    )
    assert [c["group"] for c in configs] == ["local_bbh_cot_fewshot", "local_gsm8k_cot", "local_mmlu_redux"]
    assert suite._leaf_names(configs[0]) == ["bbh_cot_fewshot_navigate"]
    assert suite._leaf_names(configs[2]) == ["mmlu_anatomy", "mmlu_virology"]
    assert [sub["group"] for sub in configs[2]["task"]] == ["stem", "other"]  # emptied categories dropped
    with pytest.raises(ValueError, match="unknown task 'hellaswag'.*--data-file hellaswag=PATH"):
        suite.build_task_configs("hellaswag", data_dir=data_dir, task_manager=manager)
    with pytest.raises(ValueError, match="not listed in --tasks"):
        suite.build_task_configs(
            "mmlu", data_dir=data_dir, data_files={"piqa": "x.jsonl"}, task_manager=manager
        )
    with pytest.raises(ValueError, match="a group or tag"):
        suite.build_task_configs(
            "mmlu", data_dir=data_dir, data_files={"mmlu": "x.csv"}, task_manager=manager
        )
    with pytest.raises(ValueError, match="evaluation split 'validation'"):
        suite.build_task_configs("piqa", data_files={"piqa": {"train": "x.jsonl"}}, task_manager=manager)
    assert suite.parse_data_file("hellaswag=/d/h.jsonl") == ("hellaswag", None, "/d/h.jsonl")
    assert suite.parse_data_file("triviaqa:train=t.json") == ("triviaqa", "train", "t.json")
    with pytest.raises(ValueError, match="TASK=PATH"):
        suite.parse_data_file("hellaswag")


def test_write_atomic_replaces_whole_files_only(tmp_path):
    target = tmp_path / "out" / "results.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second"
    with pytest.raises(TypeError):
        write_atomic(target, 123)  # fails mid-write: the old file stays, no temporary file is left
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_offline_metric_module_loads_locally_and_matches_lm_eval():
    from lm_eval.api.metrics import exact_match_hf_evaluate

    from transformers_mhc.evaluation.offline_metrics import available_metrics, load_offline_metric

    assert "exact_match" in available_metrics()
    metric = load_offline_metric("exact_match")
    predictions = ["The answer is 1,000.", "$18", "Paris", " paris!", "42"]
    references = ["#### 1000", "18", "paris", "Paris", "43"]
    for options in (
        {},
        {"ignore_case": True},
        {"ignore_case": True, "ignore_punctuation": True},
        {"regexes_to_ignore": [",", r"\$", "(?s).*#### ", r"\.$", "The answer is "], "ignore_case": True},
        {"ignore_numbers": True},
    ):
        ours = metric.compute(predictions=predictions, references=references, **options)["exact_match"]
        assert ours == pytest.approx(
            exact_match_hf_evaluate(predictions, references, **options)["exact_match"]
        )
    with pytest.raises(ValueError, match="no local metric module"):
        load_offline_metric("bleu")


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
    for task, ref_yaml in pairs.items():
        ref = Path(ref_yaml).stem
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
    first_cot = ours["samples"][f"bbh_cot_fewshot_{BBH_TASK}"][0]["arguments"][0][0]
    assert first_cot.count("Let's think step by step.") == 4
    row = next(r for r in ours["scores"] if r["task"] == f"mmlu_{MMLU_SUBJECT}")
    assert row["value"] == reference["results"]["ref_mmlu"]["acc,none"] and row["n"] == limit


def test_limited_runs_of_bbh_gsm8k_mmlu(stories260k_path, data_dir):
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
    assert len([t for t in tasks if t.startswith("bbh_cot_fewshot_")]) == 27
    assert len([t for t in tasks if t.startswith("mmlu_")]) == 57
    assert "gsm8k_cot" in tasks
    assert all(results["n-samples"][t]["effective"] == 1 for t in tasks)
    groups = results["groups"]
    assert 0.0 <= groups["local_bbh_cot_fewshot"]["exact_match,get-answer"] <= 1.0
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(groups["local_gsm8k_cot"])
    mmlu = groups["local_mmlu_redux"]["acc,none"]
    per_subject = [results["results"][t]["acc,none"] for t in tasks if t.startswith("mmlu_")]
    assert mmlu == pytest.approx(sum(per_subject) / 57)  # one question each: a plain mean
    assert report["settings"]["num_fewshot"] is None
    assert results["n-shot"]["bbh_cot_fewshot_navigate"] == 3 and results["n-shot"]["gsm8k_cot"] == 8
    markdown = suite.format_markdown(report)
    assert "local_bbh_cot_fewshot" in markdown and "mmlu_redux" in markdown and "gsm8k_cot" in markdown


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
    for task in ("gsm8k_cot", f"mmlu_{MMLU_SUBJECT}"):
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
    task = f"mmlu_{MMLU_SUBJECT}"
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
    results = report["lm_eval"]["results"]["hellaswag"]
    assert {"acc,none", "acc_norm,none"} <= set(results)
    assert report["lm_eval"]["n-samples"]["hellaswag"]["effective"] == 3
    for sample in report["samples"]["hellaswag"]:
        context = sample["arguments"][0][0]
        assert context.count(sample["doc"]["activity_label"] + ":") == 1  # its own example is not a shot
        assert context.count(":") == 2  # one shot + the question
    assert report["settings"]["data_dir"] is None


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
    assert report["lm_eval"]["n-samples"][f"mmlu_{MMLU_SUBJECT}"] == {
        "original": len(ok_rows),
        "effective": len(ok_rows),
    }
    assert report["settings"]["skip_flagged_mmlu"] is True and report["settings"]["limit"] == 200
    assert any(r["task"] == f"mmlu_{MMLU_SUBJECT}" and r["metric"] == "acc" for r in report["scores"])
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
