"""The short convolution (H3's shift SSM) is what lets decay linear attention solve associative recall.

A small MQAR setting (2 layers, hidden 64, 2 heads, sequence 32, 4 key-value pairs, vocabulary 64; 200 AdamW
steps of batch 32 at lr 6e-3) trains the same Simple Decay model (p = 0.99) with and without `short_conv_size=4`.
Measured on the 2-core CPU with 1 thread: with the short conv 0.909-0.984 over seeds 0-7 (seed 0: 0.977),
without 0.081-0.113 (seeds 0, 1, 4; chance is 1/32). At lr 3e-3, seeds 4 and 6 with the short conv stayed near
0.26 even after 300 steps, hence 6e-3. The thresholds leave a wide margin around that gap, and the seed is fixed.
Both runs take about 20-40 s on that machine under load.

Also: the study's `--append`, which adds designs to the committed results without touching their rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from transformers_mhc.evaluation.synthetic import TrainSettings, run_synthetic

SEED = 0


def mqar_accuracy(short_conv_size: int) -> float:
    [run] = run_synthetic(
        ["decay_linear_attn"],
        "mqar",
        [(32, 4)],
        d_models=(64,),
        num_layers=2,
        num_heads=2,
        vocab_size=64,
        train=TrainSettings(steps=200, batch_size=32, lr=6e-3, warmup_steps=10, eval_examples=500, seed=SEED),
        config_overrides={
            "decay_type": "simple",
            "simple_decay_init": 0.99,
            "short_conv_size": short_conv_size,
        },
    )
    return run.accuracy


STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.fixture
def recall_study(monkeypatch):
    """`studies/recall.py` as a module (it imports `_common` from its own folder)."""
    monkeypatch.syspath_prepend(str(STUDIES))
    monkeypatch.delitem(sys.modules, "recall", raising=False)
    import recall

    return recall


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_conv_solves_associative_recall(one_thread):
    with_conv = mqar_accuracy(4)
    without_conv = mqar_accuracy(0)
    assert with_conv >= 0.9, f"decay linear attention + short conv reached only {with_conv:.3f} on MQAR"
    assert without_conv <= 0.4, f"without the short conv MQAR reached {without_conv:.3f}: the gap closed"
    assert with_conv - without_conv >= 0.5


def test_append_adds_designs_and_keeps_existing_rows(recall_study, one_thread, tmp_path, monkeypatch):
    """`--append` adds designs (one task at a time if wanted) to existing results without touching their rows,
    refuses a result that is already there or one measured with other settings, and resumes an interrupted run."""
    quick = ["--quick", "--out-dir", str(tmp_path), "--seeds", "0", "--lrs", "1e-2"]
    first = recall_study.main([*quick, "--designs", "softmax"])
    recall_study.main([*quick, "--append", "--designs", "s4d", "--tasks", "mqar"])
    results = recall_study.main([*quick, "--append", "--designs", "s4d", "--tasks", "induction"])

    assert results == json.loads((tmp_path / "recall.json").read_text())
    assert not list(tmp_path.glob("recall-2.*"))
    assert results["runs"][: len(first["runs"])] == first["runs"]
    assert results["summary"][: len(first["summary"])] == first["summary"]
    assert [d["key"] for d in results["designs"]] == ["softmax", "s4d"]
    assert set(results["designs"][1]["num_parameters"]) == {"mqar", "induction"}
    assert [(s["design"], s["task"]) for s in results["summary"][2:]] == [
        ("s4d", "mqar"),
        ("s4d", "induction"),
    ]
    assert results["seconds"] == pytest.approx(
        first["seconds"] + sum(a["seconds"] for a in results["appended"])
    )
    table = (tmp_path / "recall.md").read_text()
    assert "| softmax attention (Llama) |" in table and "| diagonal SSM alone (S4D) |" in table

    with pytest.raises(SystemExit, match="already has s4d/mqar"):
        recall_study.main([*quick, "--append", "--designs", "s4d", "--tasks", "mqar"])
    with pytest.raises(SystemExit, match="mqar_steps"):
        recall_study.main([*quick, "--append", "--designs", "h3", "--mqar-steps", "5"])
    assert json.loads((tmp_path / "recall.json").read_text()) == results

    # An --append interrupted after its training runs were saved resumes without training them again.
    interrupted = {**results, "summary": results["summary"][:-1]}
    (tmp_path / "recall.json").write_text(json.dumps(interrupted))
    monkeypatch.setattr(
        recall_study, "train_one", lambda *args: pytest.fail("a recorded run was trained again")
    )
    resumed = recall_study.main([*quick, "--append", "--designs", "s4d", "--tasks", "induction"])
    assert resumed["runs"] == results["runs"] and resumed["summary"] == results["summary"]
