"""Fine-tuning a converted checkpoint (examples/finetune.py): LoRA with the HC modules, full, 2-process DDP on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from transformers_mhc import MHCForCausalLM
from transformers_mhc.conversion import convert_llama_to_mhc

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
SMALL_RUN = ["--max-chars", "20000", "--seq-len", "64", "--batch-size", "8", "--quiet"]


def load_example():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def converted(stories260k_path, tmp_path) -> Path:
    output = tmp_path / "stories260k-mhc"
    convert_llama_to_mhc(stories260k_path, output, res_logit_gap=1.0, symmetry_breaking=0.1, verify=False)
    return output


@pytest.fixture
def corpus(data_dir) -> Path:
    path = data_dir / "shakespeare" / "complete_works.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_lora_after_conversion_lowers_loss_and_trains_hyper_connections(converted, corpus, tmp_path):
    finetune = load_example()
    output = tmp_path / "lora"
    argv = ["--model", str(converted), "--output", str(output), "--mode", "lora", "--data", str(corpus)]
    summary = finetune.main([*argv, *SMALL_RUN, "--max-steps", "15", "--lr", "3e-3"])

    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.2, summary
    assert summary["hc_max_abs_change"] > 1e-3  # the HC modules received gradient and moved
    assert summary["adapter_reload_max_abs_logit_diff"] <= 1e-5
    assert summary["merged_max_abs_logit_diff"] <= 1e-4
    assert summary["merged_reload_max_abs_logit_diff"] <= 1e-4

    # The adapter carries the full HC modules (modules_to_save) next to the LoRA matrices.
    adapter_config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["modules_to_save"]) == {"attn_hc", "mlp_hc"}
    adapter = load_file(output / "adapter" / "adapter_model.safetensors")
    assert any(".attn_hc." in key for key in adapter) and any("lora_A" in key for key in adapter)

    # The merged model is a plain MHC checkpoint whose HC parameters differ from the converted ones.
    merged = AutoModelForCausalLM.from_pretrained(output / "merged")
    original = MHCForCausalLM.from_pretrained(converted)
    assert isinstance(merged, MHCForCausalLM)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    layer, layer0 = merged.model.layers[0], original.model.layers[0]
    assert not torch.equal(layer.attn_hc.static_bias, layer0.attn_hc.static_bias)
    assert not torch.equal(layer.self_attn.q_proj.weight, layer0.self_attn.q_proj.weight)  # LoRA merged in
    assert (output / "merged" / "modeling_mhc.py").is_file()


def test_full_finetune_lowers_loss(converted, corpus, tmp_path):
    finetune = load_example()
    output = tmp_path / "full"
    argv = ["--model", str(converted), "--output", str(output), "--mode", "full", "--data", str(corpus)]
    summary = finetune.main([*argv, *SMALL_RUN, "--max-steps", "8", "--lr", "2e-3"])
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["hc_max_abs_change"] > 1e-3
    reloaded = AutoModelForCausalLM.from_pretrained(output / "model")
    assert isinstance(reloaded, MHCForCausalLM)


def test_two_process_cpu_ddp_gives_identical_parameters(converted, corpus, tmp_path):
    output = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(EXAMPLE),
        *["--model", str(converted), "--output", str(output), "--data", str(corpus)],
        *[*SMALL_RUN, "--max-steps", "6", "--dump-trainable"],
    ]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"2-process run: {time.perf_counter() - start:.1f} s")

    rank0 = load_file(output / "rank0_trainable.safetensors")
    rank1 = load_file(output / "rank1_trainable.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    summary = json.loads((output / "finetune_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    # Training did happen: LoRA B matrices start at zero, HC parameters at the converted values.
    assert any("lora_B" in name and rank0[name].abs().sum() > 0 for name in rank0)
    original = MHCForCausalLM.from_pretrained(converted).model.layers[0].attn_hc.static_bias
    trained = next(v for k, v in rank0.items() if "layers.0.attn_hc" in k and k.endswith("static_bias"))
    assert not torch.equal(trained, original)
