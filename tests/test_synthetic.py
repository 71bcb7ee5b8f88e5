"""Synthetic recall: the MQAR / induction generators and `transformers-mhc synthetic`."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch

from transformers_mhc.evaluation import synthetic
from transformers_mhc.evaluation.synthetic import IGNORE_INDEX, induction_batch, mqar_batch

MQAR_CASES = [  # (seq_len, kv pairs, vocab): Zoology's grid, a tight fit and tiny vocabularies
    *[(t, kv, 8192) for t, kv in synthetic.ZOOLOGY_MQAR_SETTINGS],
    (16, 4, 64),
    (33, 3, 10),
    (64, 4, 256),
]


@pytest.mark.parametrize(("seq_len", "num_kv_pairs", "vocab_size"), MQAR_CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mqar_label_at_every_query_is_the_value_paired_with_its_key(seq_len, num_kv_pairs, vocab_size, seed):
    batch = mqar_batch(16, seq_len, num_kv_pairs, vocab_size, seed=seed)
    input_ids, labels = batch["input_ids"], batch["labels"]
    assert input_ids.shape == labels.shape == (16, seq_len)
    assert input_ids.dtype == labels.dtype == torch.long
    half = vocab_size // 2
    context = 2 * num_kv_pairs
    for ids, lab in zip(input_ids.tolist(), labels.tolist()):
        keys, values = ids[0:context:2], ids[1:context:2]
        assert len(set(keys)) == len(set(values)) == num_kv_pairs  # distinct within an example
        assert all(1 <= k < half for k in keys) and all(half <= v < vocab_size for v in values)
        assert all(0 < t < vocab_size for t in ids)
        pairs = dict(zip(keys, values))
        queries = [t for t, label in enumerate(lab) if label != IGNORE_INDEX]
        assert len(queries) == num_kv_pairs
        assert sorted(ids[t] for t in queries) == sorted(keys)  # every key asked exactly once
        for t in queries:
            assert t >= context and (t - context) % 2 == 0  # after the pairs, at an even offset
            assert lab[t] == pairs[ids[t]]


def test_mqar_is_reproducible_and_varied():
    a, b = mqar_batch(8, 64, 4, 256, seed=3), mqar_batch(8, 64, 4, 256, seed=3)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    c = mqar_batch(8, 64, 4, 256, seed=4)
    assert not torch.equal(a["input_ids"], c["input_ids"])
    # The power law favours short gaps: queries sit closer to the pairs than uniform placement would put them.
    positions = (mqar_batch(2000, 256, 16, 8192, seed=0)["labels"] != IGNORE_INDEX).nonzero()[:, 1].float()
    assert positions.mean() < 32 + (256 - 32) / 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 15, "num_kv_pairs": 4, "vocab_size": 64}, "too short"),
        ({"seq_len": 64, "num_kv_pairs": 4, "vocab_size": 8}, "num_kv_pairs"),
        ({"seq_len": 64, "num_kv_pairs": 0, "vocab_size": 64}, "num_kv_pairs"),
    ],
)
def test_mqar_rejects_impossible_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mqar_batch(2, **kwargs)


@pytest.mark.parametrize(("seq_len", "vocab_size"), [(3, 3), (16, 10), (64, 8192), (257, 50)])
@pytest.mark.parametrize("seed", [0, 1])
def test_induction_label_is_the_token_after_the_earlier_trigger(seq_len, vocab_size, seed):
    batch = induction_batch(32, seq_len, vocab_size, seed=seed)
    trigger = vocab_size - 1
    for ids, lab in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        where = [t for t, token in enumerate(ids) if token == trigger]
        assert len(where) == 2 and where[1] == seq_len - 1
        assert [t for t, label in enumerate(lab) if label != IGNORE_INDEX] == [seq_len - 1]
        assert lab[-1] == ids[where[0] + 1] != trigger
        assert all(0 < t < vocab_size for t in ids)
    with pytest.raises(ValueError, match="induction"):
        induction_batch(2, 2, 10)


def test_fast_recall_logits_equal_the_full_forward_pass():
    from transformers import AutoModelForCausalLM

    config = synthetic.build_config(
        "llama", vocab_size=64, d_model=32, num_layers=2, num_heads=2, max_seq_len=32
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    batch = mqar_batch(4, 32, 4, 64, seed=0)
    mask = batch["labels"] != IGNORE_INDEX
    with torch.no_grad():
        fast = synthetic._recall_logits(model, batch["input_ids"], mask)
        full = model(input_ids=batch["input_ids"]).logits[mask]
    torch.testing.assert_close(fast, full)
    assert (
        synthetic.recall_accuracy(model, batch)
        == (full.argmax(-1) == batch["labels"][mask]).float().mean().item()
    )


def test_build_config_rejects_unknown_arch():
    with pytest.raises(ValueError, match="arch must be one of"):
        synthetic.build_config("rwkv", vocab_size=64, d_model=32, num_layers=2, num_heads=2, max_seq_len=32)


def _synthetic_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transformers-mhc")
    synthetic.add_subparser(parser.add_subparsers(dest="command"))
    return parser


def _run_cli(tmp_path, *extra: str) -> int:
    argv = ["synthetic", "--steps", "3", "--batch-size", "8", "--eval-examples", "16", "--d-model", "16"]
    argv += ["--vocab-size", "64", "--warmup-steps", "1", "--output-dir", str(tmp_path), *extra]
    args = _synthetic_parser().parse_args(argv)
    return args.func(args)


def test_tiny_synthetic_run_writes_json_and_png(tmp_path):
    assert (
        _run_cli(
            tmp_path, "--arch", "llama", "--task", "mqar", "--settings", "16:2,32:4", "--d-model", "16,24"
        )
        == 0
    )
    report = json.loads((tmp_path / "synthetic_mqar.json").read_text())
    runs = report["runs"]
    assert [(r["d_model"], r["seq_len"], r["num_kv_pairs"]) for r in runs] == [
        (16, 16, 2),
        (16, 32, 4),
        (24, 16, 2),
        (24, 32, 4),
    ]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["num_parameters"] > 0 for r in runs)
    assert report["train"]["steps"] == 3 and report["model"]["num_layers"] == 2
    assert report["arguments"]["settings"] == "16:2,32:4" and report["arguments"]["arch"] == "llama"
    assert (tmp_path / "synthetic_mqar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert _run_cli(tmp_path, "--arch", "llama", "--task", "induction", "--settings", "16,24") == 0
    report = json.loads((tmp_path / "synthetic_induction.json").read_text())
    assert [(r["seq_len"], r["num_kv_pairs"]) for r in report["runs"]] == [(16, None), (24, None)]
    assert (tmp_path / "synthetic_induction.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "synthetic_induction.json",
        "synthetic_induction.png",
        "synthetic_mqar.json",
        "synthetic_mqar.png",
    ]


def test_bad_synthetic_arguments_fail_cleanly(tmp_path, capsys):
    assert _run_cli(tmp_path, "--arch", "rwkv", "--task", "mqar") == 2
    assert "--arch must be from" in capsys.readouterr().err
    assert _run_cli(tmp_path, "--arch", "llama", "--task", "mqar", "--settings", "64") == 2
    assert "SEQ_LEN:KV_PAIRS" in capsys.readouterr().err
    assert _run_cli(tmp_path, "--arch", "llama", "--task", "mqar", "--settings", "8:4") == 2
    assert "too short" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arch", "config_kw"),
    [
        ("mhc", ["num_streams=2"]),
        ("decay_linear_attn", ['decay_type="simple"', "short_conv_size=4"]),
    ],
)
def test_our_architectures_train_on_synthetic_tasks(arch, config_kw, tmp_path):
    config_class = {"mhc": "MHCConfig", "decay_linear_attn": "DecayLinearAttnConfig"}[arch]
    import transformers_mhc

    if not hasattr(transformers_mhc, config_class):
        pytest.skip(f"transformers_mhc.{config_class} is not available yet")
    extra = [item for kw in config_kw for item in ("--config-kw", kw)]
    assert (
        _run_cli(tmp_path, "--arch", arch, "--task", "mqar", "--settings", "16:2", "--num-heads", "2", *extra)
        == 0
    )
    report = json.loads((tmp_path / "synthetic_mqar.json").read_text())
    (run,) = report["runs"]
    assert run["arch"] == arch and 0.0 <= run["accuracy"] <= 1.0
    assert run["config_overrides"] == {k: json.loads(v) for k, v in (kw.split("=", 1) for kw in config_kw)}


@pytest.mark.slow
def test_two_layer_attention_learns_mqar_64_4():
    """A 2-layer softmax-attention (Llama) model learns MQAR (seq 64, 4 kv pairs) on CPU.

    Settings found by a small sweep (vocab 256, width 128, 1 head, lr 2e-3, 300 steps of 64 fresh
    examples); accuracy on 1000 held-out examples.
    """
    start = time.perf_counter()
    (run,) = synthetic.run_synthetic(
        ["llama"],
        "mqar",
        [(64, 4)],
        d_models=[128],
        num_layers=2,
        num_heads=1,
        vocab_size=256,
        train=synthetic.TrainSettings(steps=300, batch_size=64, lr=2e-3, warmup_steps=20, eval_examples=1000),
    )
    print(f"MQAR(64, 4): accuracy {run.accuracy:.4f} in {time.perf_counter() - start:.0f}s")
    assert run.accuracy > 0.9
