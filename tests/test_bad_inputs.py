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
"""Fuzz of both configs and of the command line with bad values.

For every field of `MHCConfig` (its own and the Llama ones) and of `DecayLinearAttnConfig`, values of the wrong type,
out of range, non-finite or absurdly large are tried. Each must either raise `ValueError` / `TypeError` naming the
field at config time, or be a value the model genuinely handles: then a tiny model is built and a forward + backward
must give finite logits, loss and gradients. Everything runs under a time limit, so a hang is a failure. The command
line gets the same treatment: one `error:` line, a non-zero exit, nothing written or deleted. Each test prints its
counts (tried / clear error / accepted as valid); run with `-s` to see them.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
import typing
from dataclasses import fields
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
from transformers_mhc.models.configuration_mhc import HyperConnectionConfigMixin

CONFIG_SECONDS = 5.0  # building a config is pure Python: anything slower is a hang
MODEL_SECONDS = 60.0

TINY_MHC = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
TINY_DECAY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
)
# Fields only read by some variants: fuzzed in the variant that reads them, so an accepted value is really used.
DECAY_CONTEXT = {
    "simple_decay_init": dict(decay_type="simple"),
    "gla_gate_normalizer": dict(decay_type="gla"),
    "hgrn2_lower_bound": dict(decay_type="hgrn2"),
    "decay_low_rank_dim": dict(decay_granularity="vector"),
    "share_decay_with_key": dict(decay_type="gla", decay_granularity="vector"),
    **{
        name: dict(decay_type="mamba2")
        for name in (
            "mamba2_a_init_min",
            "mamba2_a_init_max",
            "mamba2_dt_min",
            "mamba2_dt_max",
            "mamba2_dt_init_floor",
        )
    },
    "num_key_value_heads": dict(attention_layers=[1]),
    "attention_bias": dict(attention_layers=[1]),
    "attention_dropout": dict(attention_layers=[1]),
    "rope_parameters": dict(attention_layers=[1]),
}
HC_CONTEXT = dict(hyper_connection="mhc", num_streams=2)

NAN, INF = math.nan, math.inf
INT_BAD = [True, False, 2.5, "4", -1, 0, 3, 2**31, 10**9, NAN]
FLOAT_BAD = ["0.5", True, NAN, INF, -INF, -1.0, 0.0, 1e300, -1e300, 2]
BOOL_BAD = ["yes", "false", "true", 1, 0]
STR_BAD = [1, True, "bogus", "", "MHC"]
LIST_BAD = ["abc", [True], [1.5], [-1], [10**6], [0, 0]]
ROPE_BAD = [
    "abc",
    {"rope_type": "bogus"},
    {"rope_type": "default", "rope_theta": NAN},
    {"rope_type": "default", "rope_theta": -1.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": INF},
]


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises `Hang` in the main thread after `seconds` (Python-level loops are interrupted)."""

    def handler(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def bad_values(annotation) -> list:
    """Wrong types, boundary and absurd values for a field of this annotation."""
    args = set(typing.get_args(annotation)) or {annotation}
    values: list = []
    if int in args:
        values += INT_BAD
    if float in args:
        values += FLOAT_BAD
    if bool in args:
        values += BOOL_BAD
    if str in args:
        values += STR_BAD
    if any(typing.get_origin(arg) is list for arg in args):
        values += LIST_BAD
    if dict in args:
        values += ROPE_BAD
    if type(None) not in args:
        values.append(None)
    # Deduplicate by identity of kind (True == 1 in a set), keeping order.
    seen, unique = set(), []
    for value in values:
        key = (type(value), repr(value))
        if key not in seen:
            seen.add(key)
            unique.append(value)
    return unique


def fuzzed_fields(config_class) -> dict:
    """The package's own fields and the Llama ones (not PreTrainedConfig's generic bookkeeping fields)."""
    own = set(config_class.__annotations__) | set(HyperConnectionConfigMixin.__annotations__)
    if config_class is MHCConfig:
        own |= set(LlamaConfig.__annotations__)
    return {f.name: f.type for f in fields(config_class) if f.name in own and not f.name.startswith("_")}


def check_model(config, model_class) -> str | None:
    """Builds a tiny model and runs forward + backward; returns a problem or None."""
    torch.manual_seed(0)
    model = model_class(config)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    output = model(ids, labels=ids)
    if not torch.isfinite(output.logits).all() or not torch.isfinite(output.loss):
        return "non-finite logits or loss"
    output.loss.backward()
    bad = [
        name
        for name, p in model.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    return f"non-finite gradients in {bad[:3]}" if bad else None


def fuzz(
    config_class, model_class, base: dict, context: dict, extra_cases: list, every_accepted: bool = True
) -> tuple[dict, list]:
    """Tries every bad value of every field, then `extra_cases` (field, value, context); returns counts, problems.

    With `every_accepted=False` the model is run for the first accepted value of each field and every extra case
    only (the cheap default run); the config-time checks always cover every value.
    """
    counts = {"tried": 0, "clear error": 0, "accepted as valid": 0}
    model_checked: set[str] = set()
    problems: list[str] = []
    cases = [
        (name, value, context.get(name, {}))
        for name, annotation in fuzzed_fields(config_class).items()
        for value in bad_values(annotation)
    ]
    cases = [(*case, False) for case in cases] + [(*case, True) for case in extra_cases]
    for name, value, extra, is_extra in cases:
        counts["tried"] += 1
        label = f"{config_class.__name__}({name}={value!r}, context {extra})"
        kwargs = {**base, **extra, name: value}
        try:
            with time_limit(CONFIG_SECONDS):
                config = config_class(**kwargs)
        except (ValueError, TypeError) as error:
            counts["clear error"] += 1
            if f"`{name}`" not in str(error) and name not in str(error):
                problems.append(f"{label}: the error does not name the field: {error}")
            continue
        except Exception as error:  # noqa: BLE001 - any other exception type is a finding
            problems.append(f"{label}: {type(error).__name__} instead of ValueError/TypeError: {error}")
            continue
        counts["accepted as valid"] += 1
        if not (every_accepted or is_extra or name not in model_checked):
            continue
        model_checked.add(name)
        try:
            with time_limit(MODEL_SECONDS):
                problem = check_model(config, model_class)
        except Exception as error:  # noqa: BLE001
            problem = f"accepted, then the model failed: {type(error).__name__}: {error}"
        if problem:
            problems.append(f"{label}: {problem}")
    return counts, problems


# Values at the edges of what is accepted, in the variants that use them: still no hang and no NaN.
MHC_EDGES = [
    ("sinkhorn_iterations", 1000, {}),
    ("num_streams", 64, {}),
    ("hc_gate_init", 10.0, {}),
    ("hc_gate_init", 10.0, dict(hyper_connection="hc")),
    ("hc_res_logit_gap", 100.0, {}),
    ("hc_pre_bias_init", 100.0, {}),
    ("hc_pre_bias_init", -100.0, {}),
    ("hc_pre_bias_init", 100.0, dict(hyper_connection="hc")),
    ("hc_post_bias_init", 100.0, {}),
    ("hc_post_bias_init", -100.0, {}),
    ("hc_eps", 1.0, dict(hc_convention="deepseek_v4")),
    ("hc_symmetry_breaking", 0.999, {}),
    ("hc_recompute", True, dict(hc_recompute_interval=1024)),
    ("rms_norm_eps", 1.0, {}),
    ("initializer_range", 1.0, {}),
    ("pad_token_id", -64, {}),
]
DECAY_EDGES = [
    ("short_conv_size", 64, {}),
    ("chunk_size", 1, {}),
    ("simple_decay_init", 1e-12, {}),
    ("simple_decay_init", 1 - 1e-12, {}),
    ("gla_gate_normalizer", 1e4, dict(decay_type="gla")),
    ("mamba2_dt_max", 1000.0, dict(decay_type="mamba2", mamba2_dt_min=1000.0, mamba2_dt_init_floor=1000.0)),
    ("mamba2_a_init_max", 1000.0, dict(decay_type="mamba2", mamba2_a_init_min=1000.0)),
    ("mamba2_dt_min", 1e-300, dict(decay_type="mamba2", mamba2_dt_init_floor=1e-300)),
    ("sinkhorn_iterations", 1000, HC_CONTEXT),
    ("hc_pre_bias_init", 100.0, dict(hyper_connection="hc", num_streams=2)),
    ("positional_encoding", "tpe", dict(decay_type="lightnet")),
    ("use_delta_rule", True, dict(positional_encoding="rope", decay_granularity="vector")),
]


def report(name: str, counts: dict, seconds: float) -> None:
    print(
        f"\n{name}: " + ", ".join(f"{key} {value}" for key, value in counts.items()) + f" ({seconds:.1f} s)"
    )


def decay_context() -> dict:
    hc_fields = {name: HC_CONTEXT for name in fuzzed_fields(MHCConfig) if name.startswith("hc_")}
    return {**DECAY_CONTEXT, **hc_fields, "sinkhorn_iterations": HC_CONTEXT}


def test_fuzz_mhc_config():
    """Every value at config time; the model for one accepted value per field (all of them: the slow test)."""
    start = time.perf_counter()
    counts, problems = fuzz(MHCConfig, MHCForCausalLM, TINY_MHC, {}, MHC_EDGES, every_accepted=False)
    report("MHCConfig (mhc)", counts, time.perf_counter() - start)
    assert not problems, "\n".join(problems)
    assert counts["clear error"] > 250 and counts["accepted as valid"] > 10


def test_fuzz_mhc_config_unconstrained_hc():
    """The same values with `hyper_connection="hc"`, whose `h_pre` bias is used without a sigmoid."""
    start = time.perf_counter()
    base = {**TINY_MHC, "hyper_connection": "hc"}
    edges = [("hc_gate_init", 0.0, {}), ("hc_readout", "learned", {}), ("num_streams", 1, {})]
    counts, problems = fuzz(MHCConfig, MHCForCausalLM, base, {}, edges, every_accepted=False)
    report("MHCConfig (hc)", counts, time.perf_counter() - start)
    assert not problems, "\n".join(problems)


def test_fuzz_decay_config():
    """Every value at config time; the model for one accepted value per field (all of them: the slow test)."""
    start = time.perf_counter()
    counts, problems = fuzz(
        DecayLinearAttnConfig,
        DecayLinearAttnForCausalLM,
        TINY_DECAY,
        decay_context(),
        DECAY_EDGES,
        every_accepted=False,
    )
    report("DecayLinearAttnConfig", counts, time.perf_counter() - start)
    assert not problems, "\n".join(problems)
    assert counts["clear error"] > 400 and counts["accepted as valid"] > 10


@pytest.mark.slow
def test_fuzz_mhc_config_runs_every_accepted_value():
    start = time.perf_counter()
    counts, problems = fuzz(MHCConfig, MHCForCausalLM, TINY_MHC, {}, MHC_EDGES)
    report("MHCConfig (every accepted value run)", counts, time.perf_counter() - start)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_fuzz_decay_config_runs_every_accepted_value():
    start = time.perf_counter()
    edges = [
        *DECAY_EDGES,
        ("chunk_size", 2048, {}),
    ]  # pads 12 tokens to one 2048-token chunk: seconds, no hang
    counts, problems = fuzz(
        DecayLinearAttnConfig, DecayLinearAttnForCausalLM, TINY_DECAY, decay_context(), edges
    )
    report("DecayLinearAttnConfig (every accepted value run)", counts, time.perf_counter() - start)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    config = LlamaConfig(**TINY_MHC)
    torch.manual_seed(0)
    good = root / "llama"
    LlamaForCausalLM(config).save_pretrained(good)
    broken = {}
    for name in ("truncated", "garbage_config", "index_missing_shard", "not_a_checkpoint"):
        folder = root / name
        folder.mkdir()
        broken[name] = folder
    (broken["truncated"] / "config.json").write_bytes((good / "config.json").read_bytes())
    (broken["truncated"] / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    (broken["garbage_config"] / "config.json").write_text("{not json")
    (broken["garbage_config"] / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    (broken["index_missing_shard"] / "config.json").write_bytes((good / "config.json").read_bytes())
    (broken["index_missing_shard"] / "model.safetensors.index.json").write_text(
        '{"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}'
    )
    (broken["not_a_checkpoint"] / "notes.txt").write_text("hello")
    (root / "a_file").write_text("x")
    return {"good": good, "root": root, "file": root / "a_file", **broken}


def cli_cases(paths: dict[str, Path], out: Path) -> list[list[str]]:
    good, missing = str(paths["good"]), str(paths["root"] / "missing")
    convert = [
        [missing, str(out)],
        [str(paths["file"]), str(out)],
        [str(paths["not_a_checkpoint"]), str(out)],
        [str(paths["truncated"]), str(out)],
        [str(paths["garbage_config"]), str(out)],
        [str(paths["index_missing_shard"]), str(out)],
        [good, str(paths["file"])],
        [good, str(paths["file"] / "sub")],
        [good, str(paths["good"] / "inside")],
        [good, str(out / ".")],
    ]
    options = {
        "--num-streams": ["0", "-1", "abc", "100", "2.5", ""],
        "--hyper-connection": ["none", "bogus"],
        "--dtype": ["int8", "auto2"],
        "--res-logit-gap": ["nan", "inf", "-1", "1e9", "abc"],
        "--symmetry-breaking": ["1", "-0.1", "nan", "2"],
        "--max-shard-size": ["abc", "0", "-5GB", "", "5XB", "1.5GB"],
    }
    for option, values in options.items():
        convert += [[good, str(out), option, value] for value in values]
    quickstart = [
        ["--model", missing],
        ["--model", str(paths["not_a_checkpoint"])],
        ["--model", str(paths["truncated"])],
        ["--output", str(paths["file"])],
        ["--steps", "0"],
        ["--steps", "-1"],
        ["--steps", "abc"],
        ["--steps", str(10**9)],
        ["--num-streams", "0"],
        ["--num-streams", "100"],
        ["--lr", "0"],
        ["--lr", "nan"],
        ["--lr", "-1e-3"],
        ["--threads", "0"],
        ["--seed", "-1"],
    ]
    return [["convert", *argv] for argv in convert] + [
        ["quickstart", "--output", str(out), *argv] if "--output" not in argv else ["quickstart", *argv]
        for argv in quickstart
    ]


def test_fuzz_cli(checkpoints, tmp_path, capsys):
    """Each bad command line: one `error:` line, non-zero exit, and the existing OUTPUT folder left as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "user.txt").write_text("keep")
    counts = {"tried": 0, "clear error": 0, "accepted as valid": 0}
    problems = []
    start = time.perf_counter()
    for argv in cli_cases(checkpoints, out):
        counts["tried"] += 1
        capsys.readouterr()
        try:
            with time_limit(MODEL_SECONDS):
                code = cli.main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
        except Exception as error:  # noqa: BLE001
            problems.append(f"{argv}: raised {type(error).__name__}: {error}")
            continue
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and "Writing model shards" not in line]
        if code == 0:
            counts["accepted as valid"] += 1
            problems.append(f"{argv}: accepted")
        elif len(lines) != 1 or "error:" not in lines[0] or "Traceback" in err:
            problems.append(f"{argv}: exit {code} with\n{err}")
        else:
            counts["clear error"] += 1
        if sorted(p.name for p in out.iterdir()) != ["user.txt"]:
            problems.append(f"{argv}: changed {out}: {sorted(p.name for p in out.iterdir())}")
        leftovers = [
            p.name for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")
        ]
        if leftovers:
            problems.append(f"{argv}: left {leftovers}")
    report("transformers-mhc command line", counts, time.perf_counter() - start)
    assert not problems, "\n".join(problems)
