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
"""Training-step cost of mHC (n = 4) against the plain Llama of the same size, on CPU.

One training step = forward + backward of the causal-LM loss (fp32, batch 1, 4 layers, vocab 512). Per hidden
size, every implementation below is built once and the models are run **interleaved in one process** (after a
warm-up step each, every repetition runs each model once, in an order rotated per repetition, so load drift on a
shared machine hits all of them alike); times are medians over the repetitions.

Implementations (all wrap transformers' `LlamaAttention` / `LlamaMLP` / `LlamaRMSNorm`, sdpa attention):

- `llama`: `LlamaForCausalLM`, the baseline every ratio divides by.
- `mhc`: `MHCForCausalLM`, `num_streams=4`, paper convention (this package's torch path).
- `mhc_recompute`: the same with `hc_recompute=True` (selective recomputation, paper §5.6).
- `lucidrains`: the Llama layers, each sub-layer wrapped in `hyper_connections.ManifoldConstrainedHyperConnections`
  (n = 4, its defaults: 20 Sinkhorn iterations), streams created by repetition and summed at the end.
- `dsv4`: the Llama layers wired as transformers' `DeepseekV4DecoderLayer` does, with `DeepseekV4HyperConnection`
  around each sub-layer and `DeepseekV4HyperHead` as the readout (its Sinkhorn: 20 iterations).

Memory is measured on separate, untimed steps, two ways:

- `activation_bytes` (the ratio reported as `memory_ratio`): bytes of tensors allocated during the forward pass
  that are still alive when it returns — everything autograd holds for backward (activations, saved inputs,
  recomputation checkpoints and selective-recomputation caches) plus the loss/logits. A `TorchDispatchMode` sees
  every tensor an operator creates (forward and backward, including inside `torch.utils.checkpoint`); a weakref
  on each new storage tracks when it is freed. `peak_bytes` is the peak of the same count over forward + backward
  (adds gradients and backward temporaries).
- `saved_bytes`: bytes of the distinct storages autograd saves for backward, seen by
  `torch.autograd.graph.saved_tensors_hooks` (parameters excluded). Checkpointed regions hide their tensors from
  outer hooks, so this number is not meaningful for `mhc_recompute`; it is used for the Sinkhorn check below.

The Sinkhorn check builds `MHCForCausalLM` with `sinkhorn_iterations` 10 / 20 / 40 and records `saved_bytes` of one
training step (and of `sinkhorn_knopp` alone on `[seq, n, n]` logits): with the recomputing backward they must
not depend on the number of iterations.

    python benchmarks/bench_mhc_training.py --hidden 256 512 1024 --seq 512 --reps 7 \
        --output benchmarks/results/mhc_training.json

`--compile` also times Llama and mHC each wrapped in `torch.compile` (default mode, both compiled by a warm-up
step, interleaved as above, first `--threads` value): `compiled_summary`, ratios to compiled Llama. Under compile
the torch path writes the stream mixes in forms inductor fuses into one pass each (see `mhc_fused`).

`--quick` runs a tiny configuration (hidden 64, seq 64, 2 reps) to check the script end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from transformers_mhc import MHCConfig, MHCForCausalLM
from transformers_mhc.models.mhc_ops import sinkhorn_knopp
from transformers_mhc.outputs import fresh_path

NUM_STREAMS = 4
NUM_LAYERS = 4
VOCAB = 512
BATCH = 1
SINKHORN_ITERATIONS = 20
ALL_IMPLEMENTATIONS = ("llama", "mhc", "mhc_recompute", "lucidrains", "dsv4")


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def intermediate_size(hidden: int) -> int:
    """8/3 · hidden rounded to a multiple of 16 (256 → 688, 512 → 1360, 1024 → 2736)."""
    return int(round(8 * hidden / 3 / 16)) * 16


def llama_kwargs(hidden: int, seq: int) -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate_size(hidden),
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=max(seq, 128),
        tie_word_embeddings=False,
        use_cache=False,
    )


def build_llama(hidden: int, seq: int) -> nn.Module:
    config = LlamaConfig(**llama_kwargs(hidden, seq))
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def build_mhc(hidden: int, seq: int, **overrides) -> nn.Module:
    kwargs = dict(llama_kwargs(hidden, seq), num_streams=NUM_STREAMS, sinkhorn_iterations=SINKHORN_ITERATIONS)
    kwargs.update(overrides)
    config = MHCConfig(**kwargs)
    config._attn_implementation = "sdpa"
    return MHCForCausalLM(config)


class _HyperLlama(nn.Module):
    """A `LlamaForCausalLM` whose residual connections are replaced by a third-party hyper-connection.

    The forward pass is `LlamaModel.forward` (embeddings, rotary, causal mask, layers, norm, head, loss) with
    `_expand`, `_sublayer` and `_reduce` supplied by the subclass.
    """

    def __init__(self, hidden: int, seq: int):
        super().__init__()
        self.llama = build_llama(hidden, seq)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        model, config = self.llama.model, self.llama.config
        inputs_embeds = model.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        mask = create_causal_mask(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
        )
        position_embeddings = model.rotary_emb(inputs_embeds, position_ids=position_ids)
        streams = self._expand(inputs_embeds)
        for idx, layer in enumerate(model.layers):

            def attention(x, layer=layer):
                return layer.self_attn(
                    hidden_states=layer.input_layernorm(x),
                    attention_mask=mask,
                    position_ids=position_ids,
                    position_embeddings=position_embeddings,
                )[0]

            def mlp(x, layer=layer):
                return layer.mlp(layer.post_attention_layernorm(x))

            streams = self._sublayer(2 * idx, streams, attention)
            streams = self._sublayer(2 * idx + 1, streams, mlp)
        logits = self.llama.lm_head(model.norm(self._reduce(streams)))
        loss = self.llama.loss_function(logits=logits, labels=labels, vocab_size=config.vocab_size)
        return loss, logits


class LucidrainsMHCLlama(_HyperLlama):
    """Llama + `hyper_connections.ManifoldConstrainedHyperConnections` (lucidrains), streams in the batch dim."""

    def __init__(self, hidden: int, seq: int):
        super().__init__(hidden, seq)
        from hyper_connections import ManifoldConstrainedHyperConnections

        self.hcs = nn.ModuleList(
            ManifoldConstrainedHyperConnections(
                NUM_STREAMS, dim=hidden, layer_index=i, sinkhorn_iters=SINKHORN_ITERATIONS
            )
            for i in range(2 * NUM_LAYERS)
        )

    def _expand(self, x):  # 'b ... -> (b s) ...', as the package's expand_stream
        return x.repeat_interleave(NUM_STREAMS, dim=0)

    def _sublayer(self, idx, streams, fn):
        branch_input, add_residual = self.hcs[idx](streams)
        return add_residual(fn(branch_input))

    def _reduce(self, streams):  # '(b s) ... -> b ...', sum, as the package's reduce_stream
        return streams.unflatten(0, (-1, NUM_STREAMS)).sum(dim=1)


class DeepseekV4HCLlama(_HyperLlama):
    """Llama + transformers' `DeepseekV4HyperConnection` / `DeepseekV4HyperHead`, wired as `DeepseekV4DecoderLayer`."""

    def __init__(self, hidden: int, seq: int):
        super().__init__(hidden, seq)
        from transformers import DeepseekV4Config
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
            DeepseekV4HyperConnection,
            DeepseekV4HyperHead,
        )

        config = DeepseekV4Config(
            hidden_size=hidden,
            hc_mult=NUM_STREAMS,
            hc_sinkhorn_iters=SINKHORN_ITERATIONS,
            rms_norm_eps=self.llama.config.rms_norm_eps,
        )
        self.hcs = nn.ModuleList(DeepseekV4HyperConnection(config) for _ in range(2 * NUM_LAYERS))
        self.head = DeepseekV4HyperHead(config)
        with torch.no_grad():  # DeepseekV4PreTrainedModel._init_weights
            for hc in self.hcs:
                hc.fn.normal_(0.0, 0.02)
                hc.base.zero_()
                hc.scale.fill_(1.0)
            self.head.hc_fn.normal_(0.0, 0.02)
            self.head.hc_base.zero_()
            self.head.hc_scale.fill_(1.0)

    def _expand(self, x):
        return x.unsqueeze(2).expand(-1, -1, NUM_STREAMS, -1).contiguous()

    def _sublayer(self, idx, streams, fn):
        post, comb, collapsed = self.hcs[idx](streams)
        out = fn(collapsed)
        dtype = streams.dtype
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(
            comb.to(dtype).transpose(-1, -2), streams
        )

    def _reduce(self, streams):
        return self.head(streams)


def build(name: str, hidden: int, seq: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        model = build_llama(hidden, seq)
    elif name == "mhc":
        model = build_mhc(hidden, seq)
    elif name == "mhc_recompute":
        model = build_mhc(hidden, seq, hc_recompute=True)
    elif name == "lucidrains":
        model = LucidrainsMHCLlama(hidden, seq)
    elif name == "dsv4":
        model = DeepseekV4HCLlama(hidden, seq)
    else:
        raise ValueError(f"unknown implementation {name!r}, expected one of {ALL_IMPLEMENTATIONS}")
    return model.float().train()


def loss_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, _HyperLlama):
        return model(input_ids, labels=input_ids)[0]
    return model(input_ids=input_ids, labels=input_ids).loss


def train_step(model: nn.Module, input_ids: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    loss_of(model, input_ids).backward()


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------
class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage created by an operator while active, until that storage is freed."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: only storages no input holds are new (this also
        # skips views of parameters, which exist before the step).
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._seen and storage.nbytes() > 0 and storage.data_ptr() not in inputs:
                    self._seen[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key)
        return out


def saved_tensor_bytes(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages saved for backward by one forward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, input_ids)
    del loss
    return sum(seen.values())


def measure_memory(model: nn.Module, input_ids: torch.Tensor) -> dict:
    for p in model.parameters():
        p.grad = None
    tracker = LiveBytes()
    with tracker:
        loss = loss_of(model, input_ids)
        activation = tracker.live
        loss.backward()
        del loss
    for p in model.parameters():
        p.grad = None
    return {
        "activation_bytes": activation,
        "peak_bytes": tracker.peak,
        "saved_bytes": saved_tensor_bytes(model, input_ids),
    }


def sinkhorn_memory(hidden: int, seq: int, iterations: tuple[int, ...]) -> dict:
    """`saved_bytes` of an MHC training step and of `sinkhorn_knopp` alone, per `sinkhorn_iterations`."""
    input_ids = torch.randint(0, VOCAB, (BATCH, seq))
    model_bytes, op_bytes = {}, {}
    for iters in iterations:
        torch.manual_seed(0)
        model = build_mhc(hidden, seq, sinkhorn_iterations=iters).train()
        model_bytes[str(iters)] = saved_tensor_bytes(model, input_ids)
        logits = torch.randn(seq, NUM_STREAMS, NUM_STREAMS, requires_grad=True)
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = sinkhorn_knopp(logits, iters)
        out.sum().backward()
        op_bytes[str(iters)] = sum(seen.values())
    return {
        "hidden": hidden,
        "seq": seq,
        "model_saved_bytes": model_bytes,
        "sinkhorn_op_saved_bytes": op_bytes,
        "constant": len(set(model_bytes.values())) == 1 and len(set(op_bytes.values())) == 1,
    }


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def time_models(models: dict, input_ids: torch.Tensor, reps: int, warmup: int, threads: int) -> dict:
    """Per-step wall and CPU times, models interleaved (order rotated every repetition), after a warm-up."""
    torch.set_num_threads(threads)
    for model in models.values():  # warm-up: allocator, oneDNN/MKL kernel selection, lazy initialisation
        for _ in range(warmup):
            train_step(model, input_ids)
    names = list(models)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    load_before = os.getloadavg()[0]
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            train_step(models[name], input_ids)
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    base_wall, base_cpu = wall["llama"], cpu["llama"]
    results = {}
    for name in names:
        results[name] = {
            "time_s": wall[name],
            "cpu_time_s": cpu[name],
            "median_time_s": statistics.median(wall[name]),
            "min_time_s": min(wall[name]),
            "time_ratio": statistics.median(wall[name]) / statistics.median(base_wall),
            "time_ratio_paired_median": statistics.median([t / b for t, b in zip(wall[name], base_wall)]),
            "time_ratio_min": min(wall[name]) / min(base_wall),
            "cpu_time_ratio": statistics.median(cpu[name]) / statistics.median(base_cpu),
        }
    return {"threads": threads, "load_average_1min": [load_before, os.getloadavg()[0]], "results": results}


def bench_hidden(
    hidden: int, seq: int, reps: int, warmup: int, threads: list[int], implementations: tuple[str, ...]
) -> dict:
    torch.manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (BATCH, seq))
    models = {name: build(name, hidden, seq) for name in implementations}
    timing = [time_models(models, input_ids, reps, warmup, t) for t in threads]
    memory = {name: measure_memory(model, input_ids) for name, model in models.items()}
    base = memory["llama"]
    for mem in memory.values():
        mem["memory_ratio"] = mem["activation_bytes"] / base["activation_bytes"]
        mem["peak_memory_ratio"] = mem["peak_bytes"] / base["peak_bytes"]
        mem["saved_bytes_ratio"] = mem["saved_bytes"] / base["saved_bytes"]
    return {
        "hidden": hidden,
        "seq": seq,
        "intermediate_size": intermediate_size(hidden),
        "num_heads": max(1, hidden // 64),
        "params": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
        "memory": memory,
        "timing": timing,
    }


def bench_compiled(hidden: int, seq: int, reps: int, warmup: int, threads: int) -> dict:
    """The training step of Llama and mHC, each model wrapped in `torch.compile` (default mode; compiled by the
    warm-up step, forward and backward): the timing of `time_models`, both sides compiled."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (BATCH, seq))
    models = {name: torch.compile(build(name, hidden, seq)) for name in ("llama", "mhc")}
    return time_models(models, input_ids, reps, max(1, warmup), threads)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (hidden, threads, implementation): the ratios to Llama side by side."""
    rows = []
    for run in runs:
        for timing in run["timing"]:
            for name, r in timing["results"].items():
                rows.append(
                    {
                        "hidden": run["hidden"],
                        "threads": timing["threads"],
                        "implementation": name,
                        "median_time_s": r["median_time_s"],
                        "time_ratio": r["time_ratio"],
                        "time_ratio_paired_median": r["time_ratio_paired_median"],
                        "time_ratio_min": r["time_ratio_min"],
                        "cpu_time_ratio": r["cpu_time_ratio"],
                        "memory_ratio": run["memory"][name]["memory_ratio"],
                        "peak_memory_ratio": run["memory"][name]["peak_memory_ratio"],
                    }
                )
    return rows


def summarize_compiled(runs: list[dict]) -> list[dict]:
    """One row per (hidden, implementation) of the compiled steps, ratios to compiled Llama."""
    return [
        {
            "hidden": run["hidden"],
            "threads": run["compiled_timing"]["threads"],
            "implementation": f"{name} (compiled)",
            **{
                key: r[key]
                for key in ("median_time_s", "time_ratio", "time_ratio_paired_median", "time_ratio_min")
            },
        }
        for run in runs
        if "compiled_timing" in run
        for name, r in run["compiled_timing"]["results"].items()
    ]


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def print_rows(rows: list[dict]) -> None:
    print(
        f"\n{'hidden':>6} {'thr':>3} {'implementation':<16} {'median s':>9} {'time x':>7} {'paired':>7} "
        f"{'min x':>7} {'cpu x':>7} {'mem x':>7} {'peak x':>7}"
    )
    for r in rows:
        # Compiled rows have no CPU-time or memory columns.
        optional = (
            f"{r[key]:>7.3f}" if key in r else f"{'':>7}"
            for key in ("cpu_time_ratio", "memory_ratio", "peak_memory_ratio")
        )
        print(
            f"{r['hidden']:>6} {r['threads']:>3} {r['implementation']:<16} {r['median_time_s']:>9.3f} "
            f"{r['time_ratio']:>7.3f} {r['time_ratio_paired_median']:>7.3f} {r['time_ratio_min']:>7.3f} "
            + " ".join(optional)
        )
    sys.stdout.flush()


def plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs, rows = report["runs"], report["summary"]
    names = [n for n in runs[0]["memory"] if n != "llama"]
    threads = [t["threads"] for t in runs[0]["timing"]]
    panels = [(f"time ÷ Llama, {t} thread{'s' * (t > 1)} (median)", "time_ratio", t, 1.15) for t in threads]
    panels.append(("activation memory ÷ Llama", "memory_ratio", threads[0], 1.35))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, (title, key, t, target) in zip(axes[0], panels):
        for i, name in enumerate(names):
            values = [
                next(
                    r[key]
                    for r in rows
                    if r["hidden"] == run["hidden"] and r["threads"] == t and r["implementation"] == name
                )
                for run in runs
            ]
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(runs))]
            ax.bar(xs, values, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(target, color="red", linestyle="--", linewidth=0.8, label=f"target at C=1024: {target}")
        if key == "time_ratio":  # shared machine: show how loaded it was while each group was timed
            for j, run in enumerate(runs):
                load = next(timing["load_average_1min"] for timing in run["timing"] if timing["threads"] == t)
                ax.annotate(
                    f"load {load[0]:.1f}→{load[1]:.1f}",
                    (j, 0),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
        ax.set_xticks(range(len(runs)), [f"C={run['hidden']}" for run in runs])
        ax.set_title(title, fontsize=10)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"mHC n={NUM_STREAMS} training step (fwd+bwd), fp32 CPU, {NUM_LAYERS} layers, seq {runs[0]['seq']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument(
        "--reps", type=int, default=7, help="timed repetitions per model (>= 5 for the report)"
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values, each timed"
    )
    parser.add_argument(
        "--implementations", nargs="+", default=list(ALL_IMPLEMENTATIONS), choices=ALL_IMPLEMENTATIONS
    )
    parser.add_argument("--sinkhorn-iterations", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/mhc_training.json"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing result file (default: write beside it as NAME-2.json, ...)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny run (hidden 64, seq 32, 2 reps, 1 thread)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time Llama and mHC each under torch.compile (first --threads value; compiling takes minutes)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.seq, args.reps, args.threads = [64], 32, 2, [1]
    implementations = tuple(dict.fromkeys(["llama", *args.implementations]))

    started = time.time()
    runs = []
    for hidden in args.hidden:
        runs.append(bench_hidden(hidden, args.seq, args.reps, args.warmup, args.threads, implementations))
        if args.compile:
            runs[-1]["compiled_timing"] = bench_compiled(
                hidden, args.seq, args.reps, args.warmup, args.threads[0]
            )
        print_rows(summarize(runs[-1:]) + summarize_compiled(runs[-1:]))
    torch.set_num_threads(args.threads[0])
    sinkhorn = sinkhorn_memory(args.hidden[0], args.seq, tuple(args.sinkhorn_iterations))
    report = {
        "benchmark": "mhc_training",
        "description": "training step (forward + backward), fp32 CPU; every ratio is implementation / llama",
        "command": " ".join(
            ["python benchmarks/bench_mhc_training.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "setup": {
            "num_streams": NUM_STREAMS,
            "num_layers": NUM_LAYERS,
            "vocab_size": VOCAB,
            "batch": BATCH,
            "seq": args.seq,
            "sinkhorn_iterations": SINKHORN_ITERATIONS,
            "dtype": "float32",
            "attention": "sdpa",
            "reps": args.reps,
            "warmup": args.warmup,
            "threads": args.threads,
            "compile": args.compile,
            "time": "one forward+backward per repetition, models interleaved (order rotated per repetition); "
            "time_ratio = median / llama's median, time_ratio_paired_median = median over repetitions of "
            "time / llama's time in the same repetition, time_ratio_min = min / llama's min; cpu = process time",
            "memory": "activation_bytes: bytes allocated during forward still alive at its end (TorchDispatchMode + "
            "storage weakrefs), i.e. what is kept for backward; peak_bytes: peak of that count over "
            "forward+backward; saved_bytes: distinct non-parameter storages seen by saved_tensors_hooks (blind "
            "inside hooks of its own, so not meaningful for mhc_recompute)",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "summary": summarize(runs),
        "compiled_summary": summarize_compiled(runs),
        "runs": runs,
        "sinkhorn_memory": sinkhorn,
        "wall_time_s": time.time() - started,
    }
    args.output = fresh_path(args.output, overwrite=args.overwrite, companions=(".png",))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(
        f"\nsaved bytes by sinkhorn_iterations: model {sinkhorn['model_saved_bytes']}, "
        f"op {sinkhorn['sinkhorn_op_saved_bytes']} (constant: {sinkhorn['constant']})"
    )
    print(f"wrote {args.output} ({report['wall_time_s']:.0f} s)")
    if not args.no_plot:
        png = plot(report, args.output.with_suffix(".png"))
        if png:
            print(f"wrote {png}")
    return report


if __name__ == "__main__":
    main()
