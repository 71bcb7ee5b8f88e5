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
"""Speed and memory of `DecayLinearAttnForCausalLM` against transformers' Mamba2 and Llama, on CPU.

All models: fp32, batch 1, 4 layers, hidden 512, 8 heads of 64 (Mamba2: see below), vocab 512, built once and
run in ONE process with a fixed `torch.set_num_threads`. Every timed section warms each model up first, then runs
the compared models **interleaved** (each repetition runs every model once, in an order rotated per repetition, so
load drift on a shared machine hits all of them alike); reported times are medians over the repetitions.

Models:

Threads: `torch.set_num_threads(1)` by default. On this shared 2-core machine, 2 threads made every call 10-100x
slower (OpenMP workers spinning against other users' processes), so single-thread numbers are the stable ones.

- `decay_scalar`: Simple Decay, scalar granularity (the package defaults: chunk 64, output gate, no short conv).
- `decay_vector`: the same with `decay_granularity="vector"`.
- `llama`: `LlamaForCausalLM`, same hidden/intermediate/heads, `attn_implementation="sdpa"`.
- `mamba2_c256` / `mamba2_c64`: `Mamba2ForCausalLM` on its pure-PyTorch path (`torch_forward`; no CUDA kernels on
  CPU) with its default chunk 256 and with chunk 64. Mamba2 has no MLP, so to match the parameter count of ours it
  uses `expand=4` (32 heads of 64, state 128, 1 group); the parameter counts are in the JSON.

Sections:

(a) `train`: tokens/s of one training step (forward + backward of the causal-LM loss) at sequence `train_len`.
(b) `forward`: no-grad forward time (`use_cache=False`, `logits_to_keep=1`) of ours vs Llama over powers of two;
    the crossover is the first length from which ours stays faster.
(c) `decode`: per-token latency of single-token steps with a cache, after a prefill of `ctx` tokens done in chunks
    (`prefill_chunk` tokens per call, passing the cache along); ratio = latency at the long context / latency at the
    short one. The Llama cache (`DynamicCache`) grows by `torch.cat`, ours is a fixed-size state.
(d) `memory`: bytes saved for backward, counted with `torch.autograd.graph.saved_tensors_hooks` on a forward with
    grad (training mode): every distinct storage packed by autograd, parameters excluded, summed once. This is the
    activation memory a training step holds at the end of its forward (its peak, less parameters, gradients and
    backward temporaries). The growth exponent is the log-log slope between successive lengths (1 = linear,
    2 = quadratic). Note: CPU SDPA uses a flash-attention kernel that saves only the output and log-sum-exp, so
    Llama's saved memory is linear too; a quadratic term would only appear with eager attention.

Usage:

    python benchmarks/bench_decay_linear_attn.py            # full run -> benchmarks/results/decay_linear_attn.json
    python benchmarks/bench_decay_linear_attn.py --quick    # tiny sizes (< 1 minute), for the test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM
from transformers.cache_utils import DynamicCache

from transformers_mhc import DecayLinearAttnConfig, DecayLinearAttnForCausalLM
from transformers_mhc.outputs import fresh_path

RESULTS = Path(__file__).resolve().parent / "results"

FULL = dict(
    hidden=512,
    heads=8,
    layers=4,
    vocab=512,
    intermediate=1376,
    mamba_expand=4,
    train_len=2048,
    train_reps=5,
    forward_lens=[512, 1024, 2048, 4096, 8192, 16384],
    forward_reps=3,
    decode_short=256,
    decode_long=16384,
    decode_steps=20,
    prefill_chunk=2048,
    memory_lens=[512, 1024, 2048, 4096, 8192],
)
QUICK = dict(
    hidden=64,
    heads=2,
    layers=2,
    vocab=64,
    intermediate=128,
    mamba_expand=4,
    train_len=128,
    train_reps=2,
    forward_lens=[64, 128, 256],
    forward_reps=2,
    decode_short=32,
    decode_long=256,
    decode_steps=4,
    prefill_chunk=128,
    memory_lens=[64, 128, 256],
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_models(p: dict, max_len: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    common = dict(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["heads"],
        max_position_embeddings=max_len,
    )
    models = {
        "decay_scalar": DecayLinearAttnForCausalLM(
            DecayLinearAttnConfig(**common, decay_type="simple", decay_granularity="scalar")
        ),
        "decay_vector": DecayLinearAttnForCausalLM(
            DecayLinearAttnConfig(**common, decay_type="simple", decay_granularity="vector")
        ),
        "llama": LlamaForCausalLM(LlamaConfig(**common, attn_implementation="sdpa")),
    }
    head_dim = p["hidden"] // p["heads"]
    for chunk in (256, 64):
        cfg = Mamba2Config(
            vocab_size=p["vocab"],
            hidden_size=p["hidden"],
            num_hidden_layers=p["layers"],
            expand=p["mamba_expand"],
            head_dim=head_dim,
            num_heads=p["mamba_expand"] * p["hidden"] // head_dim,
            state_size=128 if p["hidden"] >= 256 else 16,
            n_groups=1,
            chunk_size=chunk,
        )
        models[f"mamba2_c{chunk}"] = Mamba2ForCausalLM(cfg)
    for m in models.values():
        m.float()
    return models


def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of every fn, warm-up first, the order rotated per repetition."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def train_step_fn(model, ids):
    def step():
        model.train()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def forward_fn(model, ids):
    def fwd():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    return fwd


def bench_train(models, p) -> dict:
    names = ["decay_scalar", "decay_vector", "mamba2_c256", "mamba2_c64", "llama"]
    ids = torch.randint(0, p["vocab"], (1, p["train_len"]))
    med = interleaved({n: train_step_fn(models[n], ids) for n in names}, p["train_reps"])
    tps = {n: p["train_len"] / med[n] for n in names}
    ratios = {
        f"{ours}_vs_{ref}": tps[ours] / tps[ref]
        for ours in ("decay_scalar", "decay_vector")
        for ref in ("mamba2_c256", "mamba2_c64", "llama")
    }
    return {
        "seq_len": p["train_len"],
        "reps": p["train_reps"],
        "step_seconds": med,
        "tokens_per_s": tps,
        "ratios": ratios,
    }


def bench_forward(models, p, budget_s: float) -> dict:
    names = ["decay_scalar", "llama"]
    rows, skipped = [], []
    t_start = time.perf_counter()
    last_cost = 0.0
    for length in p["forward_lens"]:
        # Ours is ~linear and Llama ~quadratic: estimate the next length as 4x the last and stop if over budget.
        elapsed = time.perf_counter() - t_start
        if rows and elapsed + 4 * last_cost > budget_s:
            skipped.append(length)
            continue
        t0 = time.perf_counter()
        ids = torch.randint(0, p["vocab"], (1, length))
        reps = p["forward_reps"]
        med = interleaved({n: forward_fn(models[n], ids) for n in names}, reps)
        last_cost = time.perf_counter() - t0
        rows.append(
            {"seq_len": length, "seconds": med, "llama_over_ours": med["llama"] / med["decay_scalar"]}
        )
        log(f"forward T={length}: ours {med['decay_scalar'] * 1e3:.1f} ms, llama {med['llama'] * 1e3:.1f} ms")
    crossover = None
    for i, row in enumerate(rows):
        if all(r["llama_over_ours"] > 1.0 for r in rows[i:]):
            crossover = row["seq_len"]
            break
    return {"rows": rows, "skipped_lengths_over_budget": skipped, "crossover_len": crossover}


def prefill(model, length: int, chunk: int, vocab: int, is_llama: bool):
    model.eval()
    cache = DynamicCache(config=model.config) if is_llama else None
    ids = torch.randint(0, vocab, (1, length))
    with torch.no_grad():
        for start in range(0, length, chunk):
            out = model(
                input_ids=ids[:, start : start + chunk],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.cache
    return cache


def decode_latency(model, cache, steps: int, vocab: int) -> float:
    """Median seconds of a single-token step (the first step is a warm-up and not counted)."""
    times = []
    tok = torch.randint(0, vocab, (1, 1))
    with torch.no_grad():
        for i in range(steps + 1):
            t0 = time.perf_counter()
            out = model(input_ids=tok, cache=cache, use_cache=True)
            dt = time.perf_counter() - t0
            cache = out.cache
            tok = out.logits[:, -1:].argmax(-1)
            if i:
                times.append(dt)
    return statistics.median(times)


def bench_decode(models, p) -> dict:
    names = ["decay_scalar", "decay_vector", "llama"]
    res = {}
    for name in names:
        model = models[name]
        per_ctx = {}
        for ctx in (p["decode_short"], p["decode_long"]):
            cache = prefill(model, ctx, p["prefill_chunk"], p["vocab"], name == "llama")
            per_ctx[ctx] = decode_latency(model, cache, p["decode_steps"], p["vocab"])
            del cache
            gc.collect()
        short, long = per_ctx[p["decode_short"]], per_ctx[p["decode_long"]]
        res[name] = {
            "ms_per_token_short": short * 1e3,
            "ms_per_token_long": long * 1e3,
            "ratio_long_over_short": long / short,
        }
        log(
            f"decode {name}: {short * 1e3:.2f} ms @ {p['decode_short']}, {long * 1e3:.2f} ms @ {p['decode_long']}"
        )
    return {
        "ctx_short": p["decode_short"],
        "ctx_long": p["decode_long"],
        "steps": p["decode_steps"],
        "models": res,
    }


def saved_bytes(model, length: int, vocab: int) -> int:
    params = {prm.untyped_storage().data_ptr() for prm in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                return t
            ptr = st.data_ptr()
            if ptr not in params and ptr not in seen:
                seen[ptr] = st.nbytes()
        return t

    model.train()
    ids = torch.randint(0, vocab, (1, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    del loss
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def bench_memory(models, p) -> dict:
    names = ["decay_scalar", "decay_vector", "llama"]
    rows = []
    for length in p["memory_lens"]:
        row = {"seq_len": length}
        for name in names:
            row[name] = saved_bytes(models[name], length, p["vocab"])
            gc.collect()
        rows.append(row)
        log(f"memory T={length}: " + ", ".join(f"{n} {row[n] / 2**20:.1f} MiB" for n in names))
    slopes = {}
    for name in names:
        slopes[name] = [
            math.log(b[name] / a[name]) / math.log(b["seq_len"] / a["seq_len"])
            for a, b in zip(rows, rows[1:])
        ]
    return {
        "method": "saved_tensors_hooks: distinct non-parameter storages packed by autograd in a training-mode forward",
        "rows_bytes": rows,
        "loglog_slopes": slopes,
    }


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rows = result["forward"]["rows"]
    for name in ("decay_scalar", "llama"):
        axes[0].loglog(
            [r["seq_len"] for r in rows], [r["seconds"][name] * 1e3 for r in rows], "o-", label=name
        )
    axes[0].set(xlabel="sequence length", ylabel="forward ms", title="(b) forward time")
    mem = result["memory"]["rows_bytes"]
    for name in ("decay_scalar", "decay_vector", "llama"):
        axes[1].loglog([r["seq_len"] for r in mem], [r[name] / 2**20 for r in mem], "o-", label=name)
    axes[1].set(xlabel="sequence length", ylabel="MiB saved for backward", title="(d) activation memory")
    tps = result["train"]["tokens_per_s"]
    axes[2].bar(list(tps), list(tps.values()))
    axes[2].set(ylabel="tokens/s", title=f"(a) training, T={result['train']['seq_len']}")
    axes[2].tick_params(axis="x", rotation=30)
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no OpenMP spin-wait thrash on a shared CPU)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "decay_linear_attn.json")
    parser.add_argument("--forward-budget", type=float, default=400.0, help="seconds for section (b)")
    parser.add_argument(
        "--mamba-expand", type=int, default=None, help="Mamba2 expand (default 4: matched params)"
    )
    parser.add_argument("--sections", default="train,forward,decode,memory")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing result file (default: write beside it as NAME-2.json, ...)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    p = dict(QUICK if args.quick else FULL)
    if args.mamba_expand is not None:
        p["mamba_expand"] = args.mamba_expand
    sections = args.sections.split(",")
    max_len = max(p["forward_lens"] + [p["decode_long"] + 64, p["train_len"]])
    models = build_models(p, max_len)
    n_params = {n: sum(x.numel() for x in m.parameters()) for n, m in models.items()}
    log(f"params: {n_params}")

    result = {
        "config": {**p, "threads": args.threads, "quick": args.quick, "dtype": "float32", "batch": 1},
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "params": n_params,
    }
    t0 = time.perf_counter()
    if "train" in sections:
        result["train"] = bench_train(models, p)
        log(f"train: {result['train']['tokens_per_s']}")
    if "forward" in sections:
        result["forward"] = bench_forward(models, p, args.forward_budget)
    if "decode" in sections:
        result["decode"] = bench_decode(models, p)
    if "memory" in sections:
        result["memory"] = bench_memory(models, p)
    result["wall_seconds"] = time.perf_counter() - t0

    args.out = fresh_path(args.out, overwrite=args.overwrite, companions=(".png",))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if all(s in result for s in ("train", "forward", "memory")):
        result["png"] = plot(result, args.out.with_suffix(".png"))
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
