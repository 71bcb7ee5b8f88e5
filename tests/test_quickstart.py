"""`transformers-mhc quickstart`: the end-to-end story on the built-in default, and its building blocks."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from transformers_mhc import MHCForCausalLM, quickstart
from transformers_mhc.data import load_text
from transformers_mhc_cli import COMMANDS


def run_quickstart_cli(argv: list[str]) -> int:
    """`transformers-mhc quickstart ...` through the sub-command module alone."""
    parser = argparse.ArgumentParser(prog="transformers-mhc")
    quickstart.add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_quickstart_default_end_to_end(tmp_path, capsys):
    assert COMMANDS["quickstart"][0] == "transformers_mhc.quickstart"
    output = tmp_path / "qs"
    assert run_quickstart_cli(["quickstart", "--output", str(output)]) == 0
    captured = capsys.readouterr()
    assert "all checks passed" in captured.out
    assert "fine-tuning" in captured.err  # the tqdm progress bar

    report = json.loads((output / quickstart.REPORT_FILE).read_text())
    print(f"quickstart timings: {report['seconds']}")
    assert report["ok"] and all(report["checks"].values())
    assert report["conversion_max_abs_logit_diff"] <= 1e-4 and report["conversion_greedy_identical"]
    assert report["loss_after"] < report["loss_before"] - 1.0  # 60 steps on one paragraph: it memorises
    assert len(report["losses"]) == 60 and report["generated"].strip()
    assert report["reload_class"].startswith("transformers_modules.")
    assert report["reload_package_importable"] is False
    assert report["reload_max_abs_logit_diff"] <= 1e-5

    finetuned = output / "finetuned"
    for name in ("config.json", "model.safetensors", "modeling_mhc.py", "tokenizer.json", "README.md"):
        assert (finetuned / name).is_file(), name
    config = json.loads((finetuned / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mhc.MHCForCausalLM"
    assert "library_name: transformers" in (finetuned / "README.md").read_text()
    # The saved model is the fine-tuned one, not the conversion.
    model = AutoModelForCausalLM.from_pretrained(finetuned)
    converted = MHCForCausalLM.from_pretrained(output / "converted")
    assert isinstance(model, MHCForCausalLM)
    assert not torch.equal(model.lm_head.weight, converted.lm_head.weight)


def test_quickstart_keeps_an_output_it_did_not_write(tmp_path, capsys):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("do not delete")
    assert run_quickstart_cli(["quickstart", "--output", str(output), "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (output / "notes.txt").read_text() == "do not delete"


def test_only_its_own_output_is_replaced_without_overwrite(tmp_path):
    ours = tmp_path / "ours"
    (ours / "converted").mkdir(parents=True)
    (ours / quickstart.REPORT_FILE).write_text("{}")
    assert quickstart._is_own_output(ours)
    (ours / "old.bin").write_text("x")  # anything the quickstart does not write makes the folder the user's
    assert not quickstart._is_own_output(ours)
    (ours / "old.bin").unlink()
    (ours / quickstart.REPORT_FILE).unlink()  # no report: not a finished quickstart run
    assert not quickstart._is_own_output(ours)


def test_model_inside_output_is_refused_before_anything_is_written(tmp_path):
    output = tmp_path / "qs"
    model = quickstart.build_tiny_llama(output / "llama")
    (output / quickstart.REPORT_FILE).write_text("{}")
    before = sorted(p.name for p in output.rglob("*"))
    with pytest.raises(ValueError, match="inside --output"):
        quickstart.run_quickstart(model=model, output=output, overwrite=True, steps=1)
    assert sorted(p.name for p in output.rglob("*")) == before


def test_bad_steps_are_refused(tmp_path):
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        quickstart.run_quickstart(output=tmp_path / "qs", steps=0)


def test_builtin_tokenizer_roundtrips_any_text():
    tokenizer = quickstart.build_tokenizer(load_text())
    text = 'Alice said: "Curiouser and curiouser!" — 1865, ünïcödé ✓'
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer) <= 384
