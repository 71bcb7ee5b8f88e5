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
"""Does `h_res` learn after conversion? Fine-tunes the original and two conversions of one checkpoint side by side.

    python benchmarks/conversion_learnability.py                      # stories260k on Shakespeare, LoRA and full
    python benchmarks/conversion_learnability.py --modes lora --steps 100

Variants, all fine-tuned on the same batches in the same order (seeded), in one process:

- `original`: the Llama checkpoint itself;
- `mhc_default_gap`: converted with the default `hc_res_logit_gap` (4.0) and no symmetry breaking;
- `mhc_learnable`: converted with a small gap (1.0) and symmetry breaking 0.1 — the "learnable" options.

Both conversions reproduce the original exactly at step 0 (checked and recorded). Per step the training loss is
recorded; every `--eval-every` steps the held-out loss and, for the MHC variants, how `h_res` has moved:

- `h_res_change`: mean over sub-layers and tokens of ‖h_res − h_res(step 0)‖_F (how much it learned);
- `h_res_offdiag`: mean off-diagonal row mass (fraction of a stream that comes from the other streams);
- `h_res_dist_identity`: mean ‖h_res − I‖_F;
- `stream_spread`: RMS over tokens of the streams' deviation from their mean, divided by the RMS of the mean, at
  the last layer (identical streams give 0, and then `h_res` gets no useful gradient).

LoRA (`--modes lora`) trains LoRA matrices on every projection plus the hyper-connection modules in full
(`modules_to_save`); `full` trains every parameter. Writes `results/conversion_learnability.json` and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import transformers_mhc
from transformers_mhc.conversion import convert_llama_to_mhc
from transformers_mhc.models.hyper_connection import HyperConnection
from transformers_mhc.models.modeling_mhc import MHCDecoderLayer
from transformers_mhc.outputs import fresh_path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFORMERS_MHC_SHARED", REPO_ROOT.parent / "shared"))
RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "original": None,
    "mhc_default_gap": {"res_logit_gap": 4.0, "symmetry_breaking": 0.0},
    "mhc_learnable": {"res_logit_gap": 1.0, "symmetry_breaking": 0.1},
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def token_blocks(tokenizer, path: Path, max_chars: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out blocks `[N, seq_len]` from the first `max_chars` characters (last 10% held out)."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        ids = torch.tensor(tokenizer(handle.read(max_chars), add_special_tokens=False).input_ids)
    blocks = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    split = int(len(blocks) * 0.9)
    return blocks[:split], blocks[split:]


@torch.no_grad()
def probe(
    model, eval_blocks: torch.Tensor, batch_size: int, reference_h_res: list[torch.Tensor] | None
) -> dict:
    """Held-out loss and the h_res statistics (captured with forward hooks on the modules actually called)."""
    model.eval()
    captured: list[torch.Tensor] = []
    spread: list[float] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: captured.append(out[1].h_res.float()))
        for m in model.modules()
        if isinstance(m, HyperConnection)
    ]
    layers = [m for m in model.modules() if isinstance(m, MHCDecoderLayer)]
    if layers:

        def stream_spread(_module, _inputs, streams):
            mean = streams.float().mean(dim=-2, keepdim=True)
            deviation = (streams.float() - mean).pow(2).mean().sqrt()
            spread.append(float(deviation / mean.pow(2).mean().sqrt()))

        hooks.append(layers[-1].register_forward_hook(stream_spread))
    losses = []
    try:
        for start in range(0, len(eval_blocks), batch_size):
            batch = eval_blocks[start : start + batch_size]
            if start == 0:
                captured.clear()
            losses.append(float(model(input_ids=batch, labels=batch).loss))
            if start == 0:
                first_h_res = list(captured)  # statistics on the first held-out batch only (fixed probe)
                first_spread = spread[0] if spread else None
    finally:
        for hook in hooks:
            hook.remove()
    model.train()
    result = {"eval_loss": sum(losses) / len(losses)}
    if first_h_res:
        n = first_h_res[0].shape[-1]
        eye = torch.eye(n)
        result["h_res_dist_identity"] = _mean(
            float((h - eye).flatten(-2).norm(dim=-1).mean()) for h in first_h_res
        )
        result["h_res_offdiag"] = _mean(float((1 - h.diagonal(dim1=-2, dim2=-1)).mean()) for h in first_h_res)
        if reference_h_res is not None:
            result["h_res_change"] = _mean(
                float((h - ref).flatten(-2).norm(dim=-1).mean())
                for h, ref in zip(first_h_res, reference_h_res)
            )
        result["stream_spread"] = first_spread
        result["_h_res"] = first_h_res
    return result


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def run_variant(
    path: Path,
    mode: str,
    train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    eval_every: int,
    seed: int,
) -> dict:
    """Fine-tunes one checkpoint; returns its per-step losses and periodic probes."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    has_hc = any(isinstance(m, HyperConnection) for m in model.modules())
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type="CAUSAL_LM",
                r=8,
                lora_alpha=16,
                lora_dropout=0.0,
                target_modules=LORA_TARGETS,
                modules_to_save=["attn_hc", "mlp_hc"] if has_hc else None,
            ),
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    order = torch.randint(
        0, len(train_blocks), (steps, batch_size), generator=torch.Generator().manual_seed(seed)
    )

    initial = probe(model, eval_blocks, batch_size, reference_h_res=None)
    reference = initial.pop("_h_res", None)  # h_res at step 0, to measure how far it moves
    if reference is not None:
        initial["h_res_change"] = 0.0
    probes = [{"step": 0, **initial}]
    train_loss = []
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = train_blocks[order[step - 1]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss.append(loss.item())
        if step % eval_every == 0 or step == steps:
            stats = probe(model, eval_blocks, batch_size, reference)
            stats.pop("_h_res", None)
            probes.append({"step": step, **stats})
            print(f"  {mode:4s} step {step:4d}  train {train_loss[-1]:.4f}  " + _fmt(stats), flush=True)
    return {
        "train_loss": train_loss,
        "probes": probes,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "seconds": time.perf_counter() - start,
    }


def _fmt(stats: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in stats.items() if isinstance(v, float))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["runs"])
    fig, axes = plt.subplots(len(modes), 3, figsize=(15, 4 * len(modes)), squeeze=False)
    colors = {"original": "tab:gray", "mhc_default_gap": "tab:blue", "mhc_learnable": "tab:orange"}
    window = 10
    for row, mode in zip(axes, modes):
        for name, run in results["runs"][mode].items():
            losses = torch.tensor(run["train_loss"])
            smooth = losses.unfold(0, window, 1).mean(-1) if len(losses) >= window else losses
            row[0].plot(range(window, window + len(smooth)), smooth, label=name, color=colors[name])
            steps = [p["step"] for p in run["probes"]]
            row[1].plot(steps, [p["eval_loss"] for p in run["probes"]], "o-", label=name, color=colors[name])
            if "h_res_change" in run["probes"][-1]:
                row[2].plot(
                    steps, [p["h_res_change"] for p in run["probes"]], "o-", label=name, color=colors[name]
                )
        row[0].set(title=f"{mode}: training loss ({window}-step mean)", xlabel="step", ylabel="loss")
        row[1].set(title=f"{mode}: held-out loss", xlabel="step", ylabel="loss")
        row[2].set(title=f"{mode}: ‖h_res − h_res(0)‖_F, mean over sub-layers", xlabel="step")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"Fine-tuning after conversion: {results['config']['model']} on {results['config']['data']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "stories260k")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "shakespeare" / "complete_works.txt")
    parser.add_argument("--modes", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-chars", type=int, default=300_000)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--full-lr", type=float, default=5e-4)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--num-streams", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: tiny model, shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "conversion_learnability.json")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing result file (default: write beside it as NAME-2.json, ...)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_blocks, eval_blocks = token_blocks(tokenizer, args.data, args.max_chars, args.seq_len)
    eval_blocks = eval_blocks[: 4 * args.batch_size]  # a fixed held-out set of 4 batches
    results: dict = {
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "model": args.model.name,
            "data": args.data.name,
            "train_blocks": len(train_blocks),
            "eval_blocks": len(eval_blocks),
            "variants": VARIANTS,
        },
        "environment": {
            "torch": torch.__version__,
            "transformers_mhc": transformers_mhc.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "conversion": {},
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="conversion-learnability-") as scratch:
        paths = {"original": args.model}
        for name, options in VARIANTS.items():
            if options is None:
                continue
            report = convert_llama_to_mhc(
                args.model, Path(scratch) / name, num_streams=args.num_streams, **options
            )
            paths[name] = Path(scratch) / name
            results["conversion"][name] = {
                "max_abs_logit_diff": report.max_abs_logit_diff,
                "greedy_agreement": report.greedy_agreement,
                "greedy_tokens": report.greedy_tokens,
            }
            print(f"converted {name}: max |logit diff| {report.max_abs_logit_diff:.2g}", flush=True)
        for mode in args.modes:
            lr = args.lora_lr if mode == "lora" else args.full_lr
            results["runs"][mode] = {}
            for name, path in paths.items():
                print(f"{mode} / {name}", flush=True)
                results["runs"][mode][name] = run_variant(
                    path,
                    mode,
                    train_blocks,
                    eval_blocks,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    lr=lr,
                    eval_every=args.eval_every,
                    seed=args.seed,
                )
    results["summary"] = {
        mode: {
            name: {
                "eval_loss_start": run["probes"][0]["eval_loss"],
                "eval_loss_end": run["probes"][-1]["eval_loss"],
                **{
                    key: run["probes"][-1][key]
                    for key in ("h_res_change", "h_res_offdiag", "h_res_dist_identity", "stream_spread")
                    if key in run["probes"][-1]
                },
                "h_res_offdiag_start": run["probes"][0].get("h_res_offdiag"),
                "stream_spread_start": run["probes"][0].get("stream_spread"),
            }
            for name, run in runs.items()
        }
        for mode, runs in results["runs"].items()
    }
    args.output = fresh_path(args.output, overwrite=args.overwrite, companions=(".png",))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    plot(results, args.output.with_suffix(".png"))
    print(json.dumps(results["summary"], indent=1))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
