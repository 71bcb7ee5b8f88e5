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
"""Inference cost of mHC (n = 4) against the plain Llama of the same size, on CPU: prefill and cached decoding.

The models are those of `bench_mhc_training.py` (fp32, batch 1, 4 layers, vocab 512, intermediate 8/3 · hidden
rounded to 16, heads of 64, sdpa attention; built by its `build_llama` / `build_mhc`), in eval mode under
`torch.no_grad()`:

- `llama`: `LlamaForCausalLM`, the baseline every ratio divides by.
- `mhc`: `MHCForCausalLM`, `num_streams=4`, `hyper_connection="mhc"`, paper convention.
- `mhc_none`: `MHCForCausalLM` with `hyper_connection="none"` (one stream, a plain residual): the sanity row, whose
  cost should equal Llama's.

Per hidden size every model is built once and the models are run **interleaved in one process**, single-threaded
(`torch.set_num_threads(1)`; on the shared 2-core machine more threads only add noise), after a warm-up call each;
the order of the models is rotated per repetition (per step in decoding), so load drift hits all of them alike.
Times are medians.

Sections:

- `prefill`: one forward of `--prefill-len` tokens (default 512) with `use_cache=True` (a fresh `DynamicCache` is
  filled); time per call, one call per model per repetition.
- `decode`: per-token time of cached decoding with plain forward calls (not `generate`, so the number is the
  model's own cost): per repetition each model prefills the same `--prompt-len`-token prompt (untimed), then
  `--decode-steps` single-token forwards are timed, each feeding the `.cache` the previous call returned
  (`cache=`, a `DynamicCache`) and the greedy next token; steps are interleaved across the models. Reported: the
  median over all repetitions × steps.
- `generate`: `model.generate(prompt, max_new_tokens=N, min_new_tokens=N, do_sample=False)` time ÷ N, one call
  per model per repetition (N = `--decode-steps`). Includes the prompt's prefill and the generation loop's own
  overhead (logits processing, stopping criteria), so it is normally a little higher per token than `decode`.
- `decode_compiled` (only with `--compile`; off by default, compilation takes minutes on CPU): the `decode` loop on
  a `StaticCache` (`max_cache_len` = prompt + steps, reset per repetition) with the forward wrapped in
  `torch.compile` (default mode) for every model; the prompt is prefilled eagerly.
- `prefill_compiled` (only with `--compile`): the `prefill` call with the forward wrapped in `torch.compile`
  (default mode, compiled for the one prefill length before timing).

Ratios, per section: `time_ratio` = median ÷ Llama's median, `time_ratio_paired_median` = median over the paired
measurements (same repetition / same step) of time ÷ Llama's time, `time_ratio_min` = min ÷ Llama's min. The
`mhc_none` ratios show the noise of a run: on a loaded shared machine they stray from 1 by 5-20 %, so run pinned
(`taskset -c 1`), note the load average (recorded in the JSON) and repeat before reading a difference that small.

    taskset -c 1 python benchmarks/bench_mhc_inference.py --hidden 512 1024 \
        --output benchmarks/results/mhc_inference.json

`--quick` runs a tiny configuration (hidden 64, prefill 32, prompt 8, 4 decode steps, 2 reps) to check the script
end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from bench_mhc_training import (
    BATCH,
    NUM_LAYERS,
    NUM_STREAMS,
    VOCAB,
    build_llama,
    build_mhc,
    intermediate_size,
)
from torch import nn
from transformers import StaticCache

import transformers_mhc
from transformers_mhc.outputs import fresh_path

MODELS = ("llama", "mhc", "mhc_none")
SECTIONS = ("prefill", "decode", "generate", "decode_compiled", "prefill_compiled")


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def build(name: str, hidden: int, max_len: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        model = build_llama(hidden, max_len)
    elif name == "mhc":
        model = build_mhc(hidden, max_len, hyper_connection="mhc", hc_convention="paper")
    elif name == "mhc_none":
        model = build_mhc(hidden, max_len, hyper_connection="none", num_streams=1)
    else:
        raise ValueError(f"unknown model {name!r}, expected one of {MODELS}")
    # The training benchmark's configs say `use_cache=False`; inference caches.
    model.config.use_cache = True
    model.generation_config.use_cache = True
    return model.float().eval()


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def rotated(names: list[str], k: int) -> list[str]:
    return names[k % len(names) :] + names[: k % len(names)]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def time_calls(calls: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Wall time of each call per repetition, interleaved (order rotated per repetition), after a warm-up."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(reps):
        for name in rotated(list(calls), rep):
            times[name].append(timed(calls[name])[0])
    return times


def time_decode(
    steps_of: dict[str, Callable[[], Callable[[], object]]], reps: int, warmup: int, steps: int
) -> dict[str, list[float]]:
    """Per-step wall times of cached decoding, steps interleaved across the models.

    `steps_of[name]()` prefills a fresh cache (untimed) and returns the function running one decode step.
    """
    names = list(steps_of)
    for _ in range(warmup):
        for start in steps_of.values():
            step = start()
            for _ in range(steps):
                step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        step_fns = {name: steps_of[name]() for name in names}
        for i in range(steps):
            for name in rotated(names, rep + i):
                times[name].append(timed(step_fns[name])[0])
    return times


def ratios(times: dict[str, list[float]], per: int = 1) -> dict:
    """Medians and ratios to Llama; `per` divides every time (tokens per call)."""
    base = times["llama"]
    results = {}
    for name, ts in times.items():
        results[name] = {
            "time_s": [t / per for t in ts],
            "median_time_s": statistics.median(ts) / per,
            "min_time_s": min(ts) / per,
            "time_ratio": statistics.median(ts) / statistics.median(base),
            "time_ratio_paired_median": statistics.median([t / b for t, b in zip(ts, base)]),
            "time_ratio_min": min(ts) / min(base),
        }
    return results


def section(times: dict[str, list[float]], per: int = 1, **extra) -> dict:
    return {**extra, "load_average_1min": os.getloadavg()[0], "results": ratios(times, per)}


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
def bench_prefill(models: dict, prefill_len: int, reps: int, warmup: int, compiled: bool = False) -> dict:
    input_ids = torch.randint(0, VOCAB, (BATCH, prefill_len))

    def call(model):
        forward = torch.compile(model.forward) if compiled else model
        return lambda: forward(input_ids=input_ids, use_cache=True)

    times = time_calls({name: call(model) for name, model in models.items()}, reps, warmup)
    return section(times, tokens=prefill_len)


def eager_decoder(model: nn.Module, prompt: torch.Tensor) -> Callable[[], Callable[[], object]]:
    def start():
        out = model(input_ids=prompt, use_cache=True)
        state = {"cache": out.cache, "token": out.logits[:, -1:].argmax(-1)}

        def step():
            out = model(input_ids=state["token"], cache=state["cache"], use_cache=True)
            state["cache"], state["token"] = out.cache, out.logits[:, -1:].argmax(-1)

        return step

    return start


def compiled_decoder(model: nn.Module, prompt: torch.Tensor, max_cache_len: int) -> Callable:
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    forward = torch.compile(model.forward)

    def start():
        cache.reset()
        positions = torch.arange(prompt.shape[1]).unsqueeze(0)
        out = model(input_ids=prompt, cache=cache, position_ids=positions, use_cache=True)
        state = {"position": prompt.shape[1], "token": out.logits[:, -1:].argmax(-1)}

        def step():
            position_ids = torch.tensor([[state["position"]]])
            out = forward(input_ids=state["token"], cache=cache, position_ids=position_ids, use_cache=True)
            state["position"] += 1
            state["token"] = out.logits[:, -1:].argmax(-1)

        return step

    return start


def bench_decode(models: dict, prompt_len: int, steps: int, reps: int, warmup: int, compiled: bool) -> dict:
    prompt = torch.randint(0, VOCAB, (BATCH, prompt_len))
    if compiled:
        starts = {name: compiled_decoder(m, prompt, prompt_len + steps) for name, m in models.items()}
    else:
        starts = {name: eager_decoder(m, prompt) for name, m in models.items()}
    times = time_decode(starts, reps, warmup, steps)
    return section(times, prompt_len=prompt_len, steps=steps)


def bench_generate(models: dict, prompt_len: int, steps: int, reps: int, warmup: int) -> dict:
    prompt = torch.randint(0, VOCAB, (BATCH, prompt_len))

    def call(model):
        return lambda: model.generate(
            prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
        )

    times = time_calls({name: call(model) for name, model in models.items()}, reps, warmup)
    return section(times, per=steps, prompt_len=prompt_len, steps=steps)


def bench_hidden(hidden: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    max_len = max(args.prefill_len, args.prompt_len + args.decode_steps)
    models = {name: build(name, hidden, max_len) for name in MODELS}
    sections = {}
    with torch.no_grad():
        sections["prefill"] = bench_prefill(models, args.prefill_len, args.reps, args.warmup)
        sections["decode"] = bench_decode(
            models, args.prompt_len, args.decode_steps, args.reps, args.warmup, compiled=False
        )
        if not args.no_generate:
            sections["generate"] = bench_generate(
                models, args.prompt_len, args.decode_steps, args.reps, args.warmup
            )
        if args.compile:
            sections["decode_compiled"] = bench_decode(
                models, args.prompt_len, args.decode_steps, args.reps, max(1, args.warmup), compiled=True
            )
            sections["prefill_compiled"] = bench_prefill(
                models, args.prefill_len, args.reps, max(1, args.warmup), compiled=True
            )
    return {
        "hidden": hidden,
        "intermediate_size": intermediate_size(hidden),
        "num_heads": max(1, hidden // 64),
        "params": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
        "sections": sections,
    }


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (hidden, section, model): median time and the ratios to Llama."""
    rows = []
    for run in runs:
        for name, sec in run["sections"].items():
            for model, r in sec["results"].items():
                rows.append(
                    {
                        "hidden": run["hidden"],
                        "section": name,
                        "model": model,
                        "median_time_s": r["median_time_s"],
                        "time_ratio": r["time_ratio"],
                        "time_ratio_paired_median": r["time_ratio_paired_median"],
                        "time_ratio_min": r["time_ratio_min"],
                    }
                )
    return rows


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def print_table(rows: list[dict]) -> None:
    """Markdown: per (hidden, section) the three models' median times (ms) and mHC's ratios to Llama."""
    print("\n| hidden | section | llama ms | mhc ms | mhc_none ms | mhc ÷ llama | paired | none ÷ llama |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    groups: dict[tuple[int, str], dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["hidden"], r["section"]), {})[r["model"]] = r
    for (hidden, name), g in groups.items():
        ms = {m: g[m]["median_time_s"] * 1e3 for m in MODELS}
        unit = " /tok" if not name.startswith("prefill") else ""
        print(
            f"| {hidden} | {name}{unit} | {ms['llama']:.2f} | {ms['mhc']:.2f} | {ms['mhc_none']:.2f} | "
            f"{g['mhc']['time_ratio']:.3f} | {g['mhc']['time_ratio_paired_median']:.3f} | "
            f"{g['mhc_none']['time_ratio']:.3f} |"
        )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--prefill-len", type=int, default=512, help="tokens of the timed prefill")
    parser.add_argument(
        "--prompt-len", type=int, default=32, help="tokens prefilled (untimed) before decoding"
    )
    parser.add_argument(
        "--decode-steps", type=int, default=32, help="timed single-token steps per repetition"
    )
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per model")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--no-generate", action="store_true", help="skip the `generate` section")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time prefill and decoding (with a StaticCache) under torch.compile (slow)",
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/mhc_inference.json"))
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing result file (default: write beside it as NAME-2.json, ...)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny run (hidden 64, prefill 32, prompt 8, 4 steps, 2 reps)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.prefill_len, args.prompt_len, args.decode_steps, args.reps = [64], 32, 8, 4, 2

    print(f"transformers_mhc from {transformers_mhc.__file__}")
    started = time.time()
    load_start = os.getloadavg()
    runs = []
    for hidden in args.hidden:
        runs.append(bench_hidden(hidden, args))
        print_table(summarize(runs[-1:]))
    report = {
        "benchmark": "mhc_inference",
        "description": "no-grad inference, fp32 CPU: prefill per call, cached decode per token; "
        "every ratio is model / llama",
        "command": " ".join(
            ["python benchmarks/bench_mhc_inference.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "setup": {
            "num_streams": NUM_STREAMS,
            "num_layers": NUM_LAYERS,
            "vocab_size": VOCAB,
            "batch": BATCH,
            "prefill_len": args.prefill_len,
            "prompt_len": args.prompt_len,
            "decode_steps": args.decode_steps,
            "dtype": "float32",
            "attention": "sdpa",
            "hc_convention": "paper",
            "reps": args.reps,
            "warmup": args.warmup,
            "threads": args.threads,
            "compile": args.compile,
            "quick": args.quick,
            "time": "models interleaved (order rotated per repetition, per step in decoding); time_ratio = median / "
            "llama's median, time_ratio_paired_median = median of time / llama's time in the same repetition "
            "(step), time_ratio_min = min / llama's min; decode/generate times are per token",
        },
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "transformers_mhc": transformers_mhc.__version__,
            "transformers_mhc_path": str(Path(transformers_mhc.__file__).parent),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average_start": list(load_start),
            "load_average_end": list(os.getloadavg()),
        },
        "summary": summarize(runs),
        "runs": runs,
        "wall_time_s": time.time() - started,
    }
    args.output = fresh_path(args.output, overwrite=args.overwrite)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.output} ({report['wall_time_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
