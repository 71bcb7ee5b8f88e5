"""Model cards: the three templates, their YAML metadata parsed back, model-index, and `transformers-mhc card`."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import BLOCK_PACKAGE
from hub_server import split_card, validate_model_card_metadata
from huggingface_hub import EvalResult, ModelCard
from transformers import LlamaConfig, PreTrainedConfig

from transformers_mhc import DecayLinearAttnConfig, DecayLinearAttnForCausalLM, MHCConfig, MHCForCausalLM
from transformers_mhc import hub as hub_module
from transformers_mhc.hub import (
    add_subparser,
    build_model_card,
    card_for_folder,
    parse_eval_results,
    write_model_card,
)
from transformers_mhc.model_cards import TEMPLATES, template_path

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_streams=2,
)
CONVERSION = {
    "max_abs_logit_diff": 3.1e-06,
    "greedy_agreement": 1.0,
    "greedy_tokens": 40,
    "num_tokens": 512,
    "prompt": "Once upon a time",
    "dtype": "float32",
    "source_model_type": "llama",
}


class DecayConfigStandIn(PreTrainedConfig):
    """The fields the decay card reads, so these tests do not depend on `DecayLinearAttnConfig`'s validation."""

    model_type = "decay_linear_attn"

    vocab_size: int = 64
    hidden_size: int = 32
    num_hidden_layers: int = 3
    num_attention_heads: int = 2
    decay_type: str = "mamba2"
    decay_granularity: str = "vector"
    share_decay_with_key: bool = True
    positional_encoding: str = "rope"
    short_conv_size: int = 4
    attention_layers: list[int] | None = None


def parsed(card: ModelCard, tmp_path: Path) -> tuple[dict, str, ModelCard]:
    """Saves the card, loads it back with `ModelCard.load`; returns (metadata dict, body, loaded card)."""
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    assert validate_model_card_metadata(path.read_text(encoding="utf-8")) == []
    return loaded.data.to_dict(), loaded.text, loaded


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="transformers-mhc")
    add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


# --- templates ------------------------------------------------------------------------------------
def test_templates_ship_with_the_package():
    for kind in TEMPLATES:
        text = template_path(kind).read_text(encoding="utf-8")
        assert text.startswith("---\n{{ card_data }}\n---\n"), kind
    with pytest.raises(ValueError, match="available"):
        template_path("gpt2")


# Runs the given scripts where `transformers_mhc` cannot be imported, as on a machine with transformers only.
SNIPPET_RUNNER = BLOCK_PACKAGE + textwrap.dedent(
    """
    import runpy, sys
    for script in sys.argv[1:]:
        runpy.run_path(script, run_name="__main__")
    """
)


def tiny_tokenizer():
    """A word-level tokenizer over the 64 ids of the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_card_snippet_runs_as_written_without_a_prompt(tmp_path):
    decay = DecayLinearAttnConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    scripts = []
    for name, model in (
        ("mhc", MHCForCausalLM(MHCConfig(**TINY))),
        ("decay", DecayLinearAttnForCausalLM(decay)),
    ):
        folder = tmp_path / name
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        [snippet] = re.findall(r"```python\n(.*?)```", build_model_card(model).text, flags=re.DOTALL)
        scripts.append(tmp_path / f"{name}_snippet.py")
        scripts[-1].write_text(snippet.replace('"path/to/model"', json.dumps(str(folder))))
    (tmp_path / "runner.py").write_text(SNIPPET_RUNNER)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    # No terminal: a `[y/N]` trust_remote_code prompt would read EOF and fail.
    result = subprocess.run(
        [sys.executable, str(tmp_path / "runner.py"), *map(str, scripts)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[y/N]" not in result.stdout + result.stderr
    assert len(result.stdout.strip().splitlines()) == 2  # one decoded continuation per snippet


# --- (a) MHC --------------------------------------------------------------------------------------
def test_mhc_card_metadata_and_body(tmp_path):
    model = MHCForCausalLM(MHCConfig(**TINY))
    card = build_model_card(
        model, model_id="me/tiny-mhc", datasets="roneneldan/TinyStories", extra_notes="*Hi*"
    )
    metadata, body, _ = parsed(card, tmp_path)
    assert metadata == {
        "datasets": ["roneneldan/TinyStories"],
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["transformers-mhc", "mhc", "hyper-connections", "custom_code"],
    }
    assert "# tiny-mhc" in body
    assert "| Residual streams (`num_streams`) | 2 |" in body
    assert "| Sinkhorn-Knopp iterations | 20 |" in body
    assert f"({sum(p.numel() for p in model.parameters()):,})" in body
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-mhc", trust_remote_code=True)' in body
    assert "## Notes\n\n*Hi*" in body
    assert "arXiv.org/abs/2512.24880".lower() in body.lower() and "2409.19606" in body
    assert "## Evaluation" not in body and "{{" not in body and "{%" not in body


@pytest.mark.parametrize(
    ("hyper_connection", "num_streams", "title"),
    [
        ("hc", 3, "(unconstrained, dynamic) hyper-connections (HC)"),
        ("none", 1, "a plain residual connection"),
    ],
)
def test_mhc_card_other_connection_types(tmp_path, hyper_connection, num_streams, title):
    config = MHCConfig(**{**TINY, "num_streams": num_streams, "hyper_connection": hyper_connection})
    metadata, body, _ = parsed(build_model_card(config), tmp_path)
    assert f'`hyper_connection="{hyper_connection}"`: {title}' in body
    assert ("hyper-connections" in metadata["tags"]) == (hyper_connection != "none")
    assert "Sinkhorn" not in body.split("## How to use")[0]
    assert 'from_pretrained("path/to/model"' in body  # no model id: a placeholder


def test_mhc_card_from_a_saved_folder_counts_parameters_from_the_headers(tmp_path):
    model = MHCForCausalLM(MHCConfig(**TINY))
    model.save_pretrained(tmp_path / "saved")
    card = build_model_card(tmp_path / "saved")
    assert f"({sum(p.numel() for p in model.parameters()):,})" in card.text
    assert "# saved" in card.text
    with pytest.raises(ValueError, match="no config.json"):
        build_model_card(tmp_path / "nothing-here")


def test_unsupported_model_type_is_refused():
    with pytest.raises(ValueError, match=r"supported: \['mhc', 'decay_linear_attn'\]"):
        build_model_card(LlamaConfig())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"license": "Apache 2"}, "license"),
        ({"datasets": ["ok", ""]}, "datasets"),
        ({"model_id": "not a repo id"}, "Repo id"),
        ({"extra_notes": 3}, "extra_notes"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model_card(MHCConfig(**TINY), **kwargs)


# --- (b) decay linear attention -------------------------------------------------------------------
@pytest.mark.parametrize("short_conv_size", [4, 0])
def test_decay_card(tmp_path, short_conv_size):
    config = DecayConfigStandIn(short_conv_size=short_conv_size, attention_layers=[1])
    metadata, body, _ = parsed(build_model_card(config, model_id="me/decay"), tmp_path)
    assert metadata["pipeline_tag"] == "text-generation" and metadata["library_name"] == "transformers"
    assert {"decay-linear-attention", "linear-attention", "hybrid-attention", "custom_code"} <= set(
        metadata["tags"]
    )
    assert ("short-convolution" in metadata["tags"]) == bool(short_conv_size)
    assert "| Decay parameterisation (`decay_type`) | `mamba2` |" in body
    assert "| Decay granularity (`decay_granularity`) | `vector` |" in body
    assert "| Decay shared with the key (`share_decay_with_key`) | True |" in body
    assert "| Positional encoding (`positional_encoding`) | `rope` |" in body
    assert "| Softmax-attention layers (`attention_layers`) | 1 (hybrid" in body
    assert "`DecayLinearAttnForCausalLM`" in body
    assert "2509.05282" in body
    assert ("2212.14052" in body) == bool(short_conv_size)  # H3 is cited for its short convolution
    assert ("kernel 4" in body) == bool(short_conv_size)


def test_decay_card_with_the_real_config(tmp_path):
    try:
        from transformers_mhc.models.configuration_decay_linear_attn import DecayLinearAttnConfig
    except ImportError:
        pytest.skip("DecayLinearAttnConfig is not available")
    config = DecayLinearAttnConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    _, body, _ = parsed(build_model_card(config), tmp_path)
    assert f"| Decay parameterisation (`decay_type`) | `{config.decay_type}` |" in body
    assert f"| Decay granularity (`decay_granularity`) | `{config.decay_granularity}` |" in body
    assert "| Token mixer (`token_mixer`) | `decay`: linear attention with decay |" in body


def test_decay_card_of_an_h3_model(tmp_path):
    from transformers_mhc import DecayLinearAttnConfig

    config = DecayLinearAttnConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        token_mixer="h3",
        short_conv_size=4,
        attention_layers="h3",
    )
    _, body, _ = parsed(build_model_card(config), tmp_path)
    assert "| Token mixer (`token_mixer`) | `h3`: H3: Q ⊙ SSM_diag(SSM_shift(K) ⊙ V)" in body
    assert "(unused by this mixer)" in body
    assert "causal depthwise on k (H3's shift SSM)" in body
    assert "2212.14052" in body


# --- (c) converted checkpoints --------------------------------------------------------------------
def test_converted_card(tmp_path):
    model = MHCForCausalLM(MHCConfig(**TINY))
    conversion = {**CONVERSION, "max_abs_logit_diff": torch.tensor(3.1e-06), "mean_abs_logit_diff": 4e-07}
    card = build_model_card(
        model, model_id="me/llama-mhc", base_model="meta-llama/Llama-3.2-1B", conversion=conversion
    )
    metadata, body, _ = parsed(card, tmp_path)
    assert metadata["base_model"] == "meta-llama/Llama-3.2-1B"
    assert {"mhc", "hyper-connections", "converted", "llama", "custom_code"} <= set(metadata["tags"])
    figures = metadata["mhc_conversion"]
    assert math.isclose(figures["max_abs_logit_diff"], 3.1e-06, rel_tol=1e-6)
    assert figures["greedy_agreement"] == 1.0 and figures["greedy_tokens"] == 40
    assert figures["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "| Max abs logit difference | 3.1e-06 over 512 tokens |" in body
    assert "| Greedy agreement | 100% (identical continuation) over 40 generated tokens" in body
    assert "| Mean abs logit diff | 4e-07 |" in body
    assert "[`meta-llama/Llama-3.2-1B`](https://huggingface.co/meta-llama/Llama-3.2-1B)" in body
    assert "| Residual streams (`num_streams`) | 2 |" in body
    assert "| Hyper-connection type (`hyper_connection`) | `mhc`" in body
    assert 'from_pretrained("me/llama-mhc", trust_remote_code=True)' in body
    assert "diagonal gap of 4.0" in body


def test_converted_card_from_a_local_checkpoint(tmp_path):
    local = tmp_path / "stories260k"
    local.mkdir()
    folder = tmp_path / "converted"
    MHCForCausalLM(MHCConfig(**TINY)).save_pretrained(folder)
    conversion = {"max_abs_logit_diff": 0.0, "greedy_agreement": 0.75}
    card = build_model_card(folder, base_model=str(local) + "/", conversion=conversion)
    metadata, body, _ = parsed(card, tmp_path)
    assert "base_model" not in metadata  # a local path is not a Hub id: named in the text only
    assert metadata["mhc_conversion"]["base_model_local"] == "stories260k"  # the name, not the machine's path
    assert str(tmp_path) not in str(card)
    assert "`stories260k` (local)" in body
    assert "75.0% of tokens identical" in body

    # Re-rendered from the folder alone, the card still names the local base model and keeps the figures.
    write_model_card(folder, card)
    again = card_for_folder(folder, extra_notes="re-rendered")
    assert "`stories260k` (local)" in again.text and "75.0% of tokens identical" in again.text
    assert "base_model" not in again.data.to_dict()
    assert again.data.to_dict()["mhc_conversion"] == metadata["mhc_conversion"]


@pytest.mark.parametrize(
    ("conversion", "match"),
    [
        ({"greedy_agreement": 1.0}, "missing \\['max_abs_logit_diff'\\]"),
        ({"max_abs_logit_diff": 0.1, "greedy_agreement": None}, "missing \\['greedy_agreement'\\]"),
        ({"max_abs_logit_diff": -1.0, "greedy_agreement": 1.0}, "max_abs_logit_diff"),
        ({"max_abs_logit_diff": float("nan"), "greedy_agreement": 1.0}, "max_abs_logit_diff"),
        ({"max_abs_logit_diff": 0.0, "greedy_agreement": 1.5}, "greedy_agreement"),
        ({"max_abs_logit_diff": 0.0, "greedy_agreement": 1.0, "greedy_tokens": "forty"}, "greedy_tokens"),
        ({"max_abs_logit_diff": 0.0, "greedy_agreement": 1.0, "extra": [1, 2]}, "extra"),
    ],
)
def test_converted_card_validates_the_figures(conversion, match):
    with pytest.raises(ValueError, match=match):
        build_model_card(MHCConfig(**TINY), base_model="meta-llama/Llama-3.2-1B", conversion=conversion)


def test_converted_card_needs_a_base_model_and_an_mhc_model():
    with pytest.raises(ValueError, match="base_model"):
        build_model_card(MHCConfig(**TINY), conversion=CONVERSION)
    with pytest.raises(ValueError, match="model_type 'mhc'"):
        build_model_card(DecayConfigStandIn(), base_model="a/b", conversion=CONVERSION)


# --- evaluation results / model-index -------------------------------------------------------------
def test_eval_results_round_trip_through_model_index(tmp_path):
    results = {"gsm8k": {"exact_match": 0.31}, "mmlu": {"acc": 0.45, "acc_norm": 0.47}}
    card = build_model_card(MHCConfig(**TINY), model_id="me/tiny-mhc", eval_results=results)
    metadata, body, loaded = parsed(card, tmp_path)
    assert metadata["metrics"] == ["exact_match", "acc", "acc_norm"]
    [entry] = metadata["model-index"]
    assert entry["name"] == "me/tiny-mhc"
    assert [r["dataset"]["type"] for r in entry["results"]] == ["gsm8k", "mmlu"]
    round_trip = {(r.dataset_type, r.metric_type): r.metric_value for r in loaded.data.eval_results}
    assert round_trip == {("gsm8k", "exact_match"): 0.31, ("mmlu", "acc"): 0.45, ("mmlu", "acc_norm"): 0.47}
    assert all(r.task_type == "text-generation" for r in loaded.data.eval_results)
    assert "| mmlu | acc_norm | 0.47 |  |  |" in body
    # A card without a model id names its model-index after the model type.
    assert build_model_card(MHCConfig(**TINY), eval_results=results).data.model_name == "mhc-model"


def test_lm_eval_results():
    lm_eval = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.012,
                "exact_match,flexible-extract": 0.3,
                "exact_match_stderr,flexible-extract": "N/A",
            },
            "arc_easy": {"alias": " - arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.02},
            "local_recall": {"alias": "local_recall", "acc,none": 0.9},
        },
        "configs": {
            "gsm8k": {
                "dataset_path": "gsm8k",
                "dataset_name": "main",
                "test_split": "test",
                "num_fewshot": 5,
            },
            "arc_easy": {"dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy", "test_split": "test"},
            "local_recall": {"dataset_path": "json", "test_split": "train"},
        },
        "n-shot": {"gsm8k": 5, "arc_easy": 0, "local_recall": 0},
    }
    results, rows = parse_eval_results(lm_eval)
    by_name = {(r.dataset_name, r.metric_name or r.metric_type): r for r in results}
    strict = by_name[("gsm8k", "exact_match (strict-match)")]
    assert (strict.metric_type, strict.metric_value, strict.dataset_config) == ("exact_match", 0.25, "main")
    assert strict.dataset_args == {"num_few_shot": 5}
    arc = by_name[("- arc_easy", "acc")]
    assert (arc.dataset_type, arc.dataset_split, arc.metric_name) == ("allenai/ai2_arc", "test", None)
    local = by_name[("local_recall", "acc")]
    assert local.dataset_type == "local_recall"  # `json` names a loader, not a dataset
    assert {
        "task": "gsm8k",
        "metric": "exact_match (strict-match)",
        "value": "0.25",
        "stderr": "0.012",
        "n_shot": "5",
    } in rows
    assert rows[1]["stderr"] == ""  # "N/A" stderr is left out
    card = build_model_card(MHCConfig(**TINY), model_id="me/m", eval_results=lm_eval)
    assert validate_model_card_metadata(str(card)) == []
    assert len(ModelCard(str(card)).data.eval_results) == 4


def test_eval_results_accept_eval_result_lists_and_model_index():
    result = EvalResult(
        task_type="text-generation",
        dataset_type="piqa",
        dataset_name="PIQA",
        metric_type="acc",
        metric_value=0.7,
    )
    assert parse_eval_results([result])[0] == [result]
    model_index = [
        {
            "name": "m",
            "results": [
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"type": "piqa", "name": "PIQA"},
                    "metrics": [{"type": "acc", "value": 0.7}],
                }
            ],
        }
    ]
    [parsed_result] = parse_eval_results(model_index)[0]
    assert (parsed_result.dataset_type, parsed_result.metric_value) == ("piqa", 0.7)


@pytest.mark.parametrize(
    ("eval_results", "match"),
    [
        ({"gsm8k": 0.3}, "must map metric names"),
        ({"gsm8k": {"acc": True}}, "number or a string"),
        ({"gsm8k": {"acc": float("nan")}}, "finite"),
        ({"gsm8k": {"alias": "gsm8k"}}, "no metric value"),
        ({}, "no task"),
        ([1, 2], "must be a dict"),
    ],
)
def test_bad_eval_results_are_refused(eval_results, match):
    with pytest.raises(ValueError, match=match):
        parse_eval_results(eval_results)


# --- `transformers-mhc card PATH` -----------------------------------------------------------------
@pytest.fixture
def saved_model(tmp_path) -> Path:
    folder = tmp_path / "model"
    MHCForCausalLM(MHCConfig(**TINY)).save_pretrained(folder)
    return folder


def test_card_cli_writes_then_rewrites_keeping_metadata(saved_model, tmp_path, capsys):
    (tmp_path / "conversion.json").write_text(json.dumps(CONVERSION))
    argv = ["card", str(saved_model), "--base-model", "meta-llama/Llama-3.2-1B", "--model-id", "me/llama-mhc"]
    assert run_cli([*argv, "--conversion", str(tmp_path / "conversion.json")]) == 0
    assert "README.md" in capsys.readouterr().out
    first, _ = split_card((saved_model / "README.md").read_text())
    assert first["base_model"] == "meta-llama/Llama-3.2-1B" and "mhc_conversion" in first

    # Re-render with evaluation results only: base model and conversion figures come from the old card.
    (tmp_path / "results.json").write_text(json.dumps({"piqa": {"acc": 0.61}}))
    assert (
        run_cli(["card", str(saved_model), "--eval-results", str(tmp_path / "results.json"), "--notes", "v2"])
        == 0
    )
    text = (saved_model / "README.md").read_text()
    second, body = split_card(text)
    assert validate_model_card_metadata(text) == []
    assert second["base_model"] == "meta-llama/Llama-3.2-1B"
    assert second["mhc_conversion"] == first["mhc_conversion"]
    assert second["model-index"][0]["results"][0]["metrics"] == [{"type": "acc", "value": 0.61}]
    assert "## Conversion exactness" in body and "## Notes\n\nv2" in body

    # --fresh ignores the old metadata: a plain MHC card.
    assert run_cli(["card", str(saved_model), "--fresh"]) == 0
    fresh, _ = split_card((saved_model / "README.md").read_text())
    assert "base_model" not in fresh and "mhc_conversion" not in fresh and "model-index" not in fresh


@pytest.mark.parametrize(
    "extra",
    [
        ["--eval-results", "{missing}"],  # unreadable file
        ["--eval-results", "{bad_json}"],  # not JSON
        ["--conversion", "{bad_conversion}"],  # figures missing
        ["--license", "Not A License"],
    ],
)
def test_card_cli_failure_keeps_the_existing_readme(saved_model, tmp_path, capsys, extra):
    readme = saved_model / "README.md"
    readme.write_text("---\nlicense: mit\n---\n\n# Hand-written card\n")
    before = readme.read_bytes()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "conversion.json").write_text(json.dumps({"greedy_agreement": 1.0}))
    paths = {
        "missing": tmp_path / "missing.json",
        "bad_json": tmp_path / "bad.json",
        "bad_conversion": tmp_path / "conversion.json",
    }
    extra = [arg.format(**paths) for arg in extra]
    argv = ["card", str(saved_model), "--base-model", "a/b", *extra]
    assert run_cli(argv) == 1
    assert "error:" in capsys.readouterr().err
    assert readme.read_bytes() == before
    assert sorted(p.name for p in saved_model.iterdir() if p.name.startswith(".")) == []


def test_card_cli_refuses_a_folder_without_config(tmp_path, capsys):
    assert run_cli(["card", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()


def test_card_cli_refuses_unparsable_existing_metadata(saved_model, capsys):
    readme = saved_model / "README.md"
    readme.write_text("---\n- just\n- a list\n---\n\nbody\n")
    assert run_cli(["card", str(saved_model)]) == 1
    assert "--fresh" in capsys.readouterr().err
    assert readme.read_text() == "---\n- just\n- a list\n---\n\nbody\n"
    assert run_cli(["card", str(saved_model), "--fresh"]) == 0


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_write_model_card_gives_the_file_normal_modes(saved_model, umask):
    previous = os.umask(umask)
    try:
        path = write_model_card(saved_model, build_model_card(saved_model))
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # 0o644 / 0o640, not mkstemp's 0o600


def test_write_model_card_is_atomic(saved_model, monkeypatch):
    readme = saved_model / "README.md"
    readme.write_text("old card\n")
    card = build_model_card(saved_model)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(hub_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_model_card(saved_model, card)
    assert readme.read_text() == "old card\n"
    assert [p.name for p in saved_model.iterdir() if p.name.startswith(".README")] == []

    monkeypatch.undo()
    assert write_model_card(saved_model, card) == readme
    assert ModelCard.load(readme).data.library_name == "transformers"
