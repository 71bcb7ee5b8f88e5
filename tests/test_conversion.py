"""Retrofit conversion of Llama-style checkpoints: exactness, dtypes, shards, safety of SOURCE and OUTPUT, CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from transformers_mhc import MHCForCausalLM
from transformers_mhc.conversion import ConversionError, convert_llama_to_mhc
from transformers_mhc.conversion import cli as convert_cli
from transformers_mhc.conversion import convert as convert_module
from transformers_mhc.data import load_text
from transformers_mhc.models.hyper_connection import HyperConnection
from transformers_mhc_cli import COMMANDS

TINY = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=128,
    initializer_range=0.2,  # decisive logits, so greedy decoding has no near-ties
    bos_token_id=1,
    eos_token_id=2,
)
TINY_MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama-tied": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 64}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny(kind: str, path: Path, dtype: torch.dtype = torch.float32, **save_kwargs) -> Path:
    config_class, model_class, extra = TINY_MODELS[kind]
    torch.manual_seed(0)
    model = model_class(config_class(**TINY, **extra)).to(dtype)
    if kind == "qwen2":  # random q/k/v biases, so the test sees whether they are carried over
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.2)
    model.save_pretrained(path, **save_kwargs)
    return path


def hash_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    """Temporary folders a conversion may leave next to OUTPUT (the zero-byte lock file is meant to stay)."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


@torch.no_grad()
def compare(
    source: Path, converted: Path, input_ids: torch.Tensor, prompt_ids: torch.Tensor, dtype=torch.float32
):
    """(max abs logit diff, greedy continuations of both) computed independently of the converter."""
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype).eval()
    assert isinstance(model, MHCForCausalLM)
    diff = (model(input_ids).logits.float() - reference(input_ids).logits.float()).abs().max().item()
    generation = GenerationConfig(
        do_sample=False, max_new_tokens=40, min_new_tokens=40, eos_token_id=2, pad_token_id=0
    )
    mask = torch.ones_like(prompt_ids)
    expected = reference.generate(prompt_ids, attention_mask=mask, generation_config=generation)
    actual = model.generate(prompt_ids, attention_mask=mask, generation_config=generation)
    return diff, expected, actual


# --------------------------------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gap, symmetry", [(4.0, 0.0), (1.0, 0.1)], ids=["default", "learnable"])
def test_stories260k_is_reproduced(stories260k_path, tmp_path, gap, symmetry):
    output = tmp_path / "stories260k-mhc"
    report = convert_llama_to_mhc(
        stories260k_path, output, num_streams=4, res_logit_gap=gap, symmetry_breaking=symmetry
    )
    tokenizer = AutoTokenizer.from_pretrained(stories260k_path)
    text = load_text()
    batch = tokenizer([text[:400], "One day, a little bird found a shiny key. " + text[400:800]]).input_ids
    input_ids = torch.tensor([ids[:48] for ids in batch])
    prompt_ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    diff, expected, actual = compare(stories260k_path, output, input_ids, prompt_ids)

    assert diff <= 1e-4
    assert actual.shape[1] == prompt_ids.shape[1] + 40
    assert torch.equal(actual, expected)
    assert "little girl named Lily" in tokenizer.decode(actual[0])
    # The converter measured the same thing and recorded it.
    assert report.max_abs_logit_diff <= 1e-4 and report.greedy_identical and report.greedy_tokens == 40
    recorded = json.loads((output / "mhc_conversion.json").read_text())
    assert recorded["max_abs_logit_diff"] == report.max_abs_logit_diff
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "mhc" and config["hc_res_logit_gap"] == gap
    assert config["hc_symmetry_breaking"] == symmetry and config["hc_readout"] == "mean"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mhc.MHCForCausalLM"
    for name in (
        "modeling_mhc.py",
        "configuration_mhc.py",
        "tokenizer.json",
        "generation_config.json",
        "README.md",
    ):
        assert (output / name).is_file(), name
    assert (output / "tokenizer.json").read_bytes() == (stories260k_path / "tokenizer.json").read_bytes()
    card = (output / "README.md").read_text()
    assert "max_abs_logit_diff" in card and "greedy_agreement: 1.0" in card


@pytest.mark.parametrize("kind", list(TINY_MODELS))
def test_tiny_random_checkpoints_are_reproduced(tmp_path, kind):
    source = save_tiny(kind, tmp_path / kind)
    output = tmp_path / f"{kind}-mhc"
    report = convert_llama_to_mhc(source, output, num_streams=3, res_logit_gap=1.0, symmetry_breaking=0.1)
    input_ids = torch.randint(3, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    diff, expected, actual = compare(source, output, input_ids, input_ids[:1, :5])
    assert diff <= 1e-4
    assert torch.equal(actual, expected)
    assert report.max_abs_logit_diff <= 1e-4 and report.greedy_identical

    model = MHCForCausalLM.from_pretrained(output)
    tied = TINY_MODELS[kind][2].get("tie_word_embeddings", False)
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    assert model.config.num_key_value_heads == 2 and model.config.num_streams == 3
    if kind == "qwen2":
        reference = Qwen2ForCausalLM.from_pretrained(source)
        assert model.config.attention_bias
        for ours, theirs in zip(model.model.layers, reference.model.layers):
            assert torch.equal(ours.self_attn.q_proj.bias, theirs.self_attn.q_proj.bias)
            assert not ours.self_attn.o_proj.bias.any()
    if kind == "mistral":
        assert any("sliding-window" in note for note in report.notes)


def test_hc_variant_is_reproduced(tmp_path):
    source = save_tiny("llama", tmp_path / "llama")
    output = tmp_path / "hc"
    convert_llama_to_mhc(source, output, num_streams=4, hyper_connection="hc", symmetry_breaking=0.2)
    input_ids = torch.randint(3, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(2))
    diff, expected, actual = compare(source, output, input_ids, input_ids[:1, :4])
    assert diff <= 1e-4 and torch.equal(actual, expected)
    assert MHCForCausalLM.from_pretrained(output).config.hyper_connection == "hc"


def test_bf16_conversion_is_within_bf16_tolerance(stories260k_path, tmp_path):
    output = tmp_path / "bf16"
    report = convert_llama_to_mhc(stories260k_path, output, dtype="bfloat16", verify=True)
    assert report.dtype == "bfloat16"
    weights = load_file(output / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}

    tokenizer = AutoTokenizer.from_pretrained(stories260k_path)
    input_ids = tokenizer(load_text()[:400], return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        exact = AutoModelForCausalLM.from_pretrained(stories260k_path).eval()(input_ids).logits
        source_bf16 = AutoModelForCausalLM.from_pretrained(stories260k_path, dtype=torch.bfloat16).eval()
        converted = AutoModelForCausalLM.from_pretrained(output).eval()
        assert converted.dtype == torch.bfloat16
        rounding = (source_bf16(input_ids).logits.float() - exact).abs().max().item()
        error = (converted(input_ids).logits.float() - exact).abs().max().item()
    # bf16 rounding of the original model itself sets the scale of "exact" here.
    assert error <= 2 * rounding + 0.05, (error, rounding)
    assert report.max_abs_logit_diff <= 2 * rounding + 0.05


def test_source_dtype_is_kept(tmp_path):
    source = save_tiny("llama", tmp_path / "llama-bf16", dtype=torch.bfloat16)
    report = convert_llama_to_mhc(source, tmp_path / "out", verify=False)
    assert report.dtype == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}


def test_sharded_in_and_out(tmp_path):
    source = save_tiny("llama", tmp_path / "sharded", max_shard_size="20KB")
    assert (source / "model.safetensors.index.json").is_file()
    output = tmp_path / "out"
    report = convert_llama_to_mhc(source, output, max_shard_size="20KB")
    index = json.loads((output / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((output / shard).is_file() for shard in shards)
    assert any(".attn_hc." in key for key in index["weight_map"])
    assert report.max_abs_logit_diff <= 1e-4 and report.greedy_identical


# --------------------------------------------------------------------------------------------------
# SOURCE and OUTPUT safety
# --------------------------------------------------------------------------------------------------
def test_source_is_byte_identical_after_conversion(stories260k_path, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(stories260k_path, source)
    for path in source.iterdir():
        path.chmod(0o644)  # writable, so that a modification would be possible
    before = hash_tree(source)
    convert_llama_to_mhc(source, tmp_path / "out", res_logit_gap=1.0, symmetry_breaking=0.1)
    assert hash_tree(source) == before


def test_unsupported_gpt2_is_refused_and_leaves_nothing(tmp_path):
    source = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32)
    ).save_pretrained(source)
    output = tmp_path / "out"
    with pytest.raises(ConversionError, match="model_type='gpt2'") as error:
        convert_llama_to_mhc(source, output)
    for supported in ("llama", "mistral", "qwen2"):
        assert supported in str(error.value)
    assert not output.exists() and leftovers(tmp_path) == []


def test_missing_config_is_refused(tmp_path):
    source = save_tiny("llama", tmp_path / "llama")
    (source / "config.json").unlink()
    with pytest.raises(ConversionError, match="no config.json.*llama"):
        convert_llama_to_mhc(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_source_folder_is_refused_without_network(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        convert_llama_to_mhc(tmp_path / "nope", tmp_path / "out")


@pytest.mark.parametrize("damage", ["drop", "reshape"])
def test_mismatched_state_dict_is_refused(tmp_path, damage):
    source = save_tiny("llama", tmp_path / "llama")
    weights = load_file(source / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    if damage == "drop":
        del weights[key]
    else:
        weights[key] = weights[key][:-3]
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="up_proj"):
        convert_llama_to_mhc(source, tmp_path / "out", verify=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    source = save_tiny("llama", tmp_path / "llama")

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(convert_module, "_measure_exactness", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        convert_llama_to_mhc(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_is_kept_without_overwrite(tmp_path, monkeypatch):
    source = save_tiny("llama", tmp_path / "llama")
    output = tmp_path / "out"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="already exists.*overwrite"):
        convert_llama_to_mhc(source, output, verify=False)
    assert hash_tree(output) == {"precious.txt": hashlib.sha256(b"keep me").hexdigest()}

    # With overwrite, a failure before completion still leaves the old OUTPUT in place...
    monkeypatch.setattr(
        convert_module, "_write_model_card", lambda *a, **k: (_ for _ in ()).throw(OSError("disk"))
    )
    with pytest.raises(OSError, match="disk"):
        convert_llama_to_mhc(source, output, overwrite=True, verify=False)
    assert (output / "precious.txt").read_text() == "keep me"
    monkeypatch.undo()
    # ... and a complete conversion replaces it.
    convert_llama_to_mhc(source, output, overwrite=True, verify=False)
    assert not (output / "precious.txt").exists() and (output / "config.json").is_file()
    assert leftovers(tmp_path) == []


def test_output_inside_source_is_refused(tmp_path):
    source = save_tiny("llama", tmp_path / "llama")
    with pytest.raises(ConversionError, match="inside SOURCE"):
        convert_llama_to_mhc(source, source / "mhc")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_streams": 0}, "num_streams must be an integer >= 1, got 0"),
        ({"hyper_connection": "none"}, r"hyper_connection must be one of \['mhc', 'hc'\], got 'none'"),
        ({"dtype": "int8"}, "dtype must be one of .*got 'int8'"),
        ({"symmetry_breaking": 1.0}, r"symmetry_breaking must be a number in \[0, 1\), got 1.0"),
        ({"res_logit_gap": -1.0}, "res_logit_gap must be a finite number >= 0, got -1.0"),
    ],
)
def test_bad_arguments_name_the_value(tmp_path, kwargs, message):
    source = save_tiny("llama", tmp_path / "llama")
    with pytest.raises(ConversionError, match=message):
        convert_llama_to_mhc(source, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Command line and what a converted model can do
# --------------------------------------------------------------------------------------------------
def run_convert_cli(argv: list[str]) -> int:
    """`transformers-mhc convert ...` through the sub-command module alone (independent of the other commands)."""
    parser = argparse.ArgumentParser(prog="transformers-mhc")
    convert_cli.add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_convert(tmp_path, capsys):
    assert COMMANDS["convert"][0] == "transformers_mhc.conversion.cli"
    source = save_tiny("llama-tied", tmp_path / "llama")
    output = tmp_path / "out"
    argv = ["convert", str(source), str(output), "--num-streams", "2", "--res-logit-gap", "1.0"]
    assert run_convert_cli([*argv, "--symmetry-breaking", "0.1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_streams"] == 2 and report["greedy_identical"] and report["max_abs_logit_diff"] <= 1e-4
    assert report["symmetry_breaking"] == 0.1 and report["res_logit_gap"] == 1.0

    assert run_convert_cli(argv) == 1  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert run_convert_cli([*argv, "--overwrite", "--no-verify"]) == 0

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32)
    ).save_pretrained(gpt2)
    assert run_convert_cli(["convert", str(gpt2), str(tmp_path / "x")]) == 1
    assert "Supported checkpoints: llama" in capsys.readouterr().err


def test_converted_hyper_connections_get_gradient(tmp_path):
    """Every trainable hyper-connection parameter of a converted model receives a gradient at step 0
    (alpha through the random phi; static_bias directly) except phi, whose gate starts at zero."""
    source = save_tiny("llama", tmp_path / "llama")
    convert_llama_to_mhc(source, tmp_path / "out", res_logit_gap=1.0, symmetry_breaking=0.1, verify=False)
    model = MHCForCausalLM.from_pretrained(tmp_path / "out")
    input_ids = torch.randint(3, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    model(input_ids, labels=input_ids).loss.backward()
    hc = next(m for m in model.modules() if isinstance(m, HyperConnection))
    assert hc.alpha.grad.abs().sum() > 0
    assert hc.static_bias.grad.abs().sum() > 0


def test_hub_id_goes_through_snapshot_download(tmp_path, monkeypatch):
    """A SOURCE that is not a folder is fetched with `snapshot_download` (faked here: tests never download)."""
    import huggingface_hub

    local = save_tiny("llama", tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    report = convert_llama_to_mhc("some-org/tiny-llama", tmp_path / "out", num_streams=2)
    assert calls == [("some-org/tiny-llama", None, convert_module.HUB_PATTERNS)]
    assert report.source == "some-org/tiny-llama" and report.greedy_identical
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: some-org/tiny-llama" in card  # a Hub id becomes card metadata

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConversionError, match="could not be fetched from the Hub.*offline"):
        convert_llama_to_mhc("some-org/missing", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
