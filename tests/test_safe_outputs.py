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
"""Issue 9's reproductions: nothing on disk is lost, a mismatched checkpoint or a user mistake gives one clear error.

Kills and concurrent runs happen in subprocesses (`python -c`), so a kill is a real `SIGKILL` at a chosen moment.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from transformers_mhc import (
    DecayLinearAttnConfig,
    DecayLinearAttnForCausalLM,
    MHCConfig,
    MHCForCausalLM,
    cli,
)
from transformers_mhc.conversion import ConversionError, convert_llama_to_mhc
from transformers_mhc.outputs import (
    MARKER_FILE,
    OutputError,
    OutputFolder,
    check_output_path,
    fresh_path,
    lock_path,
    work_path,
)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}


def tiny_llama(path: Path) -> Path:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def hidden(parent: Path) -> list[str]:
    """What a writer left beside its output, other than the zero-byte lock file that is meant to stay."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what the test's own setup printed (progress bars)
    code = cli.main(argv)
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("transformers-mhc") and "error:" in lines[0], err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# A conversion in a subprocess whose `_write_model_card` first announces itself (a file) and then waits (for
# `<announce>.release` or `sleep` seconds), so the test can act while the conversion holds OUTPUT; `_renameat2` can be disabled and a SIGKILL injected at a rename.
_DRIVER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from transformers_mhc import cli, outputs
    from transformers_mhc.conversion import convert as convert_module

    announce, sleep, kill_at_rename = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    write_card = convert_module._write_model_card

    def slow_card(report, folder):
        Path(announce).write_text("in")
        deadline = time.monotonic() + sleep
        while time.monotonic() < deadline and not Path(announce + ".release").exists():
            time.sleep(0.05)
        write_card(report, folder)

    convert_module._write_model_card = slow_card
    if kill_at_rename:
        outputs._renameat2 = lambda *args: False  # the two-rename fallback of file systems without RENAME_EXCHANGE
        rename, count = Path.rename, [0]

        def rename_then_die(self, target):
            count[0] += 1
            if count[0] == kill_at_rename:
                os.kill(os.getpid(), signal.SIGKILL)
            return rename(self, target)

        Path.rename = rename_then_die
    sys.exit(cli.main(sys.argv[4:]))
    """
)


def start_convert(
    tmp_path: Path, argv: list[str], sleep: float = 0.0, kill_at_rename: int = 0, tag: str = "a"
):
    announce = tmp_path / f"announce-{tag}"
    process = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(announce), str(sleep), str(kill_at_rename), *argv],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, announce


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# Data loss / clobbering
# --------------------------------------------------------------------------------------------------
def test_quickstart_with_a_missing_model_keeps_output(tmp_path, capsys, monkeypatch):
    """`quickstart --model /typo --output q` deleted everything in q before checking --model."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "user.txt").write_text("mine")
    code, err = run_cli(["quickstart", "--model", str(tmp_path / "typo"), "--output", "q"], capsys)
    assert_one_error_line(code, err, "--model", "typo", "does not exist")
    assert tree(tmp_path / "q") == {"user.txt": hashlib.sha256(b"mine").hexdigest()}
    assert hidden(tmp_path) == [] and not lock_path(tmp_path / "q").exists()


def test_concurrent_converts_exactly_one_succeeds(tmp_path):
    """Two `convert SRC OUT` runs at once both exited 0, the later one deleting the other's OUTPUT."""
    source = tiny_llama(tmp_path / "src")
    argv = ["convert", str(source), str(tmp_path / "out"), "--no-verify"]
    first, announce = start_convert(tmp_path, argv, sleep=300.0, tag="first")
    wait_for(announce, first)  # the first run holds OUTPUT now
    second = subprocess.run(
        [sys.executable, "-m", "transformers_mhc.cli", *argv],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    Path(f"{announce}.release").write_text("go on")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 1 and "being written by another transformers-mhc process" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert json.loads((tmp_path / "out" / "mhc_conversion.json").read_text())["source"] == str(source)
    assert hidden(tmp_path) == []


@pytest.mark.slow
def test_concurrent_converts_started_together_exactly_one_succeeds(tmp_path):
    """The same race without a pause: whichever run comes second fails, whichever way the timing falls."""
    source = tiny_llama(tmp_path / "src")
    argv = ["convert", str(source), str(tmp_path / "out2"), "--no-verify"]
    runs = [start_convert(tmp_path, argv, tag=tag)[0] for tag in ("x", "y")]
    results = [(run.wait(timeout=300), run.communicate()[1]) for run in runs]
    assert sorted(code for code, _ in results) == [0, 1], results
    failure = next(err for code, err in results if code == 1)
    assert "already exists" in failure or "being written by another" in failure
    assert (tmp_path / "out2" / "config.json").is_file() and hidden(tmp_path) == []


def test_kill_between_the_two_renames_is_repaired_by_the_next_run(tmp_path):
    """A kill between `OUTPUT -> backup` and `staging -> OUTPUT` left no OUTPUT (only a hidden backup)."""
    source = tiny_llama(tmp_path / "src")
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old checkpoint")
    # Renames in `commit`: OUTPUT -> previous (1), staging -> OUTPUT (2): die just before the second.
    argv = ["convert", str(source), str(output), "--no-verify", "--overwrite"]
    process, _ = start_convert(tmp_path, argv, kill_at_rename=2)
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    assert not output.exists() and (work_path(output) / "previous" / "old.txt").is_file()

    # The next run, whatever it is, first puts the old OUTPUT back; without --overwrite it then stops.
    with pytest.raises(ConversionError, match="already exists"):
        convert_llama_to_mhc(source, output, verify=False)
    assert tree(output) == {"old.txt": hashlib.sha256(b"old checkpoint").hexdigest()}
    assert hidden(tmp_path) == []


def test_killed_conversion_leaves_nothing_the_next_run_does_not_clean(tmp_path):
    """Killed runs left `.OUT.converting-<hex>` staging folders that were never cleaned."""
    source = tiny_llama(tmp_path / "src")
    output = tmp_path / "out"
    argv = ["convert", str(source), str(output), "--no-verify"]
    for attempt in range(2):  # two killed runs: no pile-up, one work folder at most
        process, announce = start_convert(tmp_path, argv, sleep=60.0, tag=str(attempt))
        wait_for(announce, process)
        assert (work_path(output) / "staging" / "config.json").is_file()
        process.kill()
        process.communicate(timeout=60)
        assert not output.exists() and hidden(tmp_path) == [work_path(output).name]
    report = convert_llama_to_mhc(source, output, verify=False)
    assert (output / "config.json").is_file() and hidden(tmp_path) == []
    assert report.notes == []  # a stale staging folder is simply removed


def test_overwrite_through_a_symlink_replaces_its_target(tmp_path):
    """`--overwrite` onto a symlink left a `.link.replaced-<hex>` behind."""
    source = tiny_llama(tmp_path / "src")
    target = tmp_path / "real"
    target.mkdir()
    (target / "old.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ConversionError, match="symlink.*--overwrite"):
        convert_llama_to_mhc(source, link, verify=False)
    convert_llama_to_mhc(source, link, verify=False, overwrite=True)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "config.json").is_file() and not (target / "old.txt").exists()
    assert hidden(tmp_path) == []

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConversionError, match="does not exist"):
        convert_llama_to_mhc(source, dangling, verify=False, overwrite=True)
    assert not (tmp_path / "nowhere").exists()


def test_benchmarks_do_not_replace_existing_results(tmp_path):
    """`bench_mhc_training.py --quick` overwrote the committed `benchmarks/results/*` the README quotes."""
    result = tmp_path / "bench_mhc_kernels.json"
    result.write_text('{"committed": true}')
    # On a CPU this benchmark records "skipped" at once, through the same path choice as the others.
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_mhc_kernels.py"), "--output", str(result)],
        env={**ENV, "CUDA_VISIBLE_DEVICES": ""},
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert json.loads(result.read_text()) == {"committed": True}
    assert json.loads((tmp_path / "bench_mhc_kernels-2.json").read_text())["benchmark"] == "mhc_kernels"

    (tmp_path / "plot.png").write_text("png")  # a companion plot also counts as taken
    assert fresh_path(tmp_path / "plot.json", companions=(".png",)) == tmp_path / "plot-2.json"
    assert fresh_path(result, overwrite=True) == result
    for script in (
        "benchmarks/bench_mhc_training.py",
        "benchmarks/bench_decay_linear_attn.py",
        "benchmarks/conversion_learnability.py",
        "studies/stability.py",
        "studies/decay.py",
    ):
        text = (REPO / script).read_text()
        assert "fresh_path(" in text and '"--overwrite"' in text, script


def test_gitignore_covers_the_readme_example_outputs(tmp_path):
    names = [
        "mhc-quickstart/x",
        "stories-mhc/config.json",
        "ft/x",
        "ft2/x",
        ".stories-mhc.transformers-mhc.lock",
    ]
    result = subprocess.run(["git", "check-ignore", *names], cwd=REPO, capture_output=True, text=True)
    if result.returncode == 128:
        pytest.skip(f"not a git checkout: {result.stderr.strip()}")
    assert sorted(result.stdout.split()) == sorted(names)


# --------------------------------------------------------------------------------------------------
# The output folder itself
# --------------------------------------------------------------------------------------------------
def test_output_folder_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        OutputFolder(output)
    with pytest.raises(RuntimeError):
        with OutputFolder(output, overwrite=True) as folder:
            (folder.staging / "new.txt").write_text("new")
            assert (output / "old.txt").is_file()
            raise RuntimeError("fails before commit")
    assert tree(output) == {"old.txt": hashlib.sha256(b"old").hexdigest()} and hidden(tmp_path) == []
    with OutputFolder(output, overwrite=True) as folder:
        (folder.staging / "new.txt").write_text("new")
        folder.commit()
    assert tree(output) == {"new.txt": hashlib.sha256(b"new").hexdigest()} and hidden(tmp_path) == []


def test_in_place_output_folder_puts_the_old_one_back(tmp_path):
    """The quickstart's mode: it writes into OUTPUT itself, the old folder waits aside until the run has finished."""
    output = tmp_path / "qs"
    output.mkdir()
    (output / "report.json").write_text("old run")

    def complete(path: Path) -> bool:
        return (path / "report.json").is_file()

    with pytest.raises(RuntimeError):
        with OutputFolder(output, overwrite=True, in_place=True, is_complete=complete) as folder:
            (folder.path / "partial.bin").write_text("half")
            assert (work_path(output) / "previous" / "report.json").is_file()
            raise RuntimeError("the run fails")
    assert tree(output) == {"report.json": hashlib.sha256(b"old run").hexdigest()} and hidden(tmp_path) == []

    # What a SIGKILL in the middle of a run leaves: the old folder aside, an incomplete new one in place.
    work = work_path(output)
    work.mkdir()
    output.rename(work / "previous")
    output.mkdir()
    (output / "partial.bin").write_text("half")
    (work / MARKER_FILE).write_text(json.dumps({"in_place": True}))
    with OutputFolder(output, overwrite=True, in_place=True, is_complete=complete) as folder:
        assert folder.notes and "restored" in folder.notes[0]
        assert not (output / "partial.bin").exists()  # recovery put the old folder back, then moved it aside
        (folder.path / "report.json").write_text("new run")
        folder.commit()
    assert tree(output) == {"report.json": hashlib.sha256(b"new run").hexdigest()} and hidden(tmp_path) == []


def test_output_folder_refuses_a_work_folder_that_is_not_its_own(tmp_path):
    output = tmp_path / "out"
    foreign = work_path(output)
    foreign.mkdir()
    (foreign / "data.bin").write_text("someone else's")
    with pytest.raises(OutputError, match="not created by transformers-mhc"):
        with OutputFolder(output):
            pass
    assert (foreign / "data.bin").read_text() == "someone else's"
    (foreign / "data.bin").unlink()
    (foreign / MARKER_FILE).write_text("{}")  # ours: a stale one is cleaned
    with OutputFolder(output) as folder:
        folder.commit()
    assert output.is_dir() and hidden(tmp_path) == []


def test_output_path_checks_write_nothing(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output_path(tmp_path / "file", overwrite=True)
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_path(tmp_path / "file" / "out")
    with pytest.raises(OutputError, match="names no folder"):
        check_output_path(tmp_path / "..")
    # A read-only parent (simulated: this test may run as root, which ignores permission bits).
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(OutputError, match="no permission to write into"):
        check_output_path(tmp_path / "sub" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --------------------------------------------------------------------------------------------------
# Errors that were tracebacks, late, or wrong
# --------------------------------------------------------------------------------------------------
def test_decay_checkpoint_into_mhc_class_names_both_sides(tmp_path):
    decay = tmp_path / "decay"
    config = DecayLinearAttnConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    DecayLinearAttnForCausalLM(config).save_pretrained(decay)
    with pytest.raises(ValueError, match="'decay_linear_attn'.*MHCConfig reads `model_type`='mhc'"):
        MHCForCausalLM.from_pretrained(decay)
    mhc = tmp_path / "mhc"
    mhc_config = MHCConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_streams=2,
    )
    MHCForCausalLM(mhc_config).save_pretrained(mhc)
    with pytest.raises(ValueError, match="'mhc'.*DecayLinearAttnConfig reads"):
        DecayLinearAttnForCausalLM.from_pretrained(mhc)

    # A hand-edited model_type is named together with the class that saved the checkpoint.
    data = json.loads((mhc / "config.json").read_text())
    (mhc / "config.json").write_text(json.dumps({**data, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"'llama' \(saved by MHCForCausalLM\).*MHCConfig"):
        MHCForCausalLM.from_pretrained(mhc)


def test_loaded_config_json_gets_the_same_checks(tmp_path):
    config = DecayLinearAttnConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    for field, value, error in (
        ("share_decay_with_key", "yes", TypeError),  # said "got 'scalar'" before
        ("use_delta_rule", "yes", TypeError),
        ("hc_dynamic", "false", TypeError),
        ("num_hidden_layers", 2**31, ValueError),
        ("mamba2_dt_max", math.inf, ValueError),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**data, field: value}))
        with pytest.raises(error) as caught:
            DecayLinearAttnConfig.from_pretrained(tmp_path)
        assert f"`{field}`" in str(caught.value) and repr(value) in str(caught.value)


def test_truncated_shard_names_the_file(tmp_path, capsys):
    source = tiny_llama(tmp_path / "src")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, err = run_cli(["convert", str(source), str(tmp_path / "out")], capsys)
    assert_one_error_line(code, err, str(weights), "truncated")
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_nan_weights_in_source_are_a_clear_error(tmp_path, capsys):
    source = tiny_llama(tmp_path / "src")
    model = LlamaForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(source)
    code, err = run_cli(["convert", str(source), str(tmp_path / "out")], capsys)
    assert_one_error_line(code, err, "NaN", "model.layers.1.mlp.up_proj.weight")
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_bad_max_shard_size_fails_before_loading(tmp_path, capsys, monkeypatch):
    source = tiny_llama(tmp_path / "src")

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights loaded before --max-shard-size was checked")

    monkeypatch.setattr("transformers_mhc.conversion.convert._load_converted", must_not_load)
    code, err = run_cli(["convert", str(source), str(tmp_path / "out"), "--max-shard-size", "abc"], capsys)
    assert_one_error_line(code, err, "max_shard_size", "'abc'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unwritable_output_parent_is_one_line(tmp_path, capsys, monkeypatch):
    source = tiny_llama(tmp_path / "src")
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # root ignores permission bits
    code, err = run_cli(["convert", str(source), str(tmp_path / "ro" / "out")], capsys)
    assert_one_error_line(code, err, "no permission to write into")
    monkeypatch.undo()

    # A PermissionError the checks could not foresee (e.g. a read-only mount) is still one line.
    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    code, err = run_cli(["convert", str(source), str(tmp_path / "ro2" / "out")], capsys)
    assert_one_error_line(code, err, "permission denied", "ro2")
    with pytest.raises(PermissionError):  # --debug shows the real exception instead
        cli.main(["convert", str(source), str(tmp_path / "ro3" / "out"), "--debug"])


def test_push_to_an_unreachable_endpoint_is_one_line(tmp_path):
    folder = tmp_path / "model"
    config = MHCConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_streams=2,
    )
    MHCForCausalLM(config).save_pretrained(folder)
    env = {**ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_dummy"}
    env.pop("HF_HUB_OFFLINE")
    result = subprocess.run(
        [sys.executable, "-m", "transformers_mhc.cli", "push", str(folder), "someone/tiny-mhc"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_error_line(result.returncode, result.stderr, "127.0.0.1:9")


@pytest.mark.slow
def test_kill_at_random_moments_never_loses_output_or_touches_source(tmp_path):
    """`kill -9` at random moments of `convert --overwrite`: OUTPUT is always the old or the new checkpoint."""
    import random

    source = tiny_llama(tmp_path / "src")
    source_tree = tree(source)
    output = tmp_path / "out"
    convert_llama_to_mhc(source, output, verify=False)
    argv = [sys.executable, "-m", "transformers_mhc.cli", "convert", str(source), str(output), "--overwrite"]
    started = time.monotonic()
    subprocess.run(argv, env=ENV, check=True, capture_output=True, timeout=300)
    duration = time.monotonic() - started
    rng = random.Random(0)
    for _ in range(6):
        process = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.1) * duration)
        process.kill()
        process.wait(timeout=60)
        # renameat2(RENAME_EXCHANGE) swaps old and new in one step: a complete OUTPUT at every instant. (On a file
        # system without it, a kill between the two renames leaves the old one aside, put back by the next run.)
        if not output.exists():
            assert (work_path(output) / "previous" / "mhc_conversion.json").is_file()
            convert_llama_to_mhc(source, output, verify=False, overwrite=True)
        assert (output / "config.json").is_file() and (output / "mhc_conversion.json").is_file()
        assert tree(source) == source_tree
    convert_llama_to_mhc(source, output, verify=False, overwrite=True)
    assert hidden(tmp_path) == []


def test_finetune_example_refuses_an_output_with_files_before_loading(tmp_path, capsys):
    """`examples/finetune.py` wrote into an existing --output (the README's `ft/`) without asking."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_example", REPO / "examples" / "finetune.py")
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    output = tmp_path / "ft"
    output.mkdir()
    assert finetune.parse_args(["--model", "m", "--output", str(output)]).output == str(output)  # empty: fine
    (output / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        finetune.parse_args(["--model", "m", "--output", str(output)])
    assert exit_.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert finetune.parse_args(["--model", "m", "--output", str(output), "--overwrite"]).overwrite
