"""Decay study: which decay parameterisation trains best, and where its values sit (decay paper §2-3, issue 5 item 4).

Trains small `DecayLinearAttnForCausalLM` models on the Shakespeare corpus (byte level) for a fixed step budget,
one per (decay type, granularity): Mamba2, GLA, HGRN2, LightNet (scalar and vector), TNL and TNL-L (scalar only:
they have one value per head), and Simple Decay with `p ∈ {0.8, 0.9, 0.95, 0.99}` (scalar and vector). Every run
uses the same seed, the same batches in the same order and the same AdamW schedule (linear warm-up, constant,
linear decay over the last 20%: a small WSD). After training it reports the held-out loss and, via
`transformers_mhc.decay_statistics`, the per-layer median of λ on held-out text (also measured at initialisation).

Outputs `<out-dir>/decay.json`, `<out-dir>/decay.md` (the table) and `<out-dir>/decay.png`.

    nice -n 10 python studies/decay.py --steps 100 --batch 4 --out-dir studies/results

`--quick` runs a tiny configuration (2 layers, hidden 32, a few steps) to check the script end to end.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import (
    VOCAB_SIZE,
    add_data_argument,
    environment,
    evaluate_loss,
    fixed_batches,
    load_corpus,
    sample_batch,
    write_json_atomic,
)

from transformers_mhc.outputs import fresh_path

ALL_DECAY_TYPES = ("mamba2", "gla", "hgrn2", "lightnet", "tnl", "tnl_learnable", "simple")
SCALAR_ONLY = ("tnl", "tnl_learnable")
DEFAULT_P = (0.8, 0.9, 0.95, 0.99)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_argument(parser)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing result files (default: write beside them as NAME-2.json, ...)",
    )
    parser.add_argument("--decay-types", nargs="+", choices=ALL_DECAY_TYPES, default=list(ALL_DECAY_TYPES))
    parser.add_argument(
        "--granularities", nargs="+", choices=("scalar", "vector"), default=["scalar", "vector"]
    )
    parser.add_argument(
        "--p", nargs="+", type=float, default=list(DEFAULT_P), help="Simple Decay initial medians"
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 3 x hidden)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warm-up")
    parser.add_argument("--cooldown", type=float, default=0.2, help="fraction of steps of final linear decay")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 = none)")
    parser.add_argument("--val-batches", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--max-bytes", type=int, default=None, help="use only this prefix of the corpus")
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps, to test the script")
    # --quick changes the defaults only, so explicit flags (e.g. --steps) still win.
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(
            layers=2, hidden=32, heads=2, seq=32, batch=2, steps=4, val_batches=1, max_bytes=200_000
        )
    args = parser.parse_args(argv)
    if args.intermediate is None:
        args.intermediate = 3 * args.hidden
    return args


def run_specs(args: argparse.Namespace) -> list[dict]:
    """The (decay type, granularity, p) combinations to train, skipping vector granularity where it is invalid."""
    specs = []
    for decay_type in args.decay_types:
        for granularity in args.granularities:
            if decay_type in SCALAR_ONLY and granularity == "vector":
                continue
            for p in args.p if decay_type == "simple" else [None]:
                label = f"simple(p={p:g})" if p is not None else decay_type
                specs.append(
                    {
                        "name": f"{label}/{granularity}",
                        "decay_type": decay_type,
                        "granularity": granularity,
                        "p": p,
                    }
                )
    return specs


def build_model(spec: dict, args: argparse.Namespace):
    from transformers_mhc import DecayLinearAttnConfig, DecayLinearAttnForCausalLM

    kwargs = {"simple_decay_init": spec["p"]} if spec["p"] is not None else {}
    config = DecayLinearAttnConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=args.seq,
        decay_type=spec["decay_type"],
        decay_granularity=spec["granularity"],
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    )
    torch.manual_seed(args.seed)
    return DecayLinearAttnForCausalLM(config)


def layer_medians(stats) -> list[float]:
    """Per-layer median of λ from the output of `decay_statistics`.

    Accepts `{"per_layer": [{"median": ...}, ...]}`, a list of such dicts, or `{"median": [...]}`.
    """
    if isinstance(stats, dict) and "per_layer" in stats:
        stats = stats["per_layer"]
    if isinstance(stats, dict) and "median" in stats:
        return [float(m) for m in stats["median"]]
    if isinstance(stats, dict):  # keyed by layer index / name
        stats = [stats[k] for k in sorted(stats, key=lambda k: int(k) if str(k).isdigit() else str(k))]
    if isinstance(stats, list) and all(isinstance(s, dict) and "median" in s for s in stats):
        return [float(s["median"]) for s in stats]
    raise TypeError(f"unrecognised decay_statistics output: {type(stats).__name__} {str(stats)[:200]}")


def lr_factor(step: int, args: argparse.Namespace) -> float:
    """Warm-up / stable / decay multiplier of the base learning rate at `step` (1-based)."""
    warmup = max(1, round(args.warmup * args.steps))
    cooldown = round(args.cooldown * args.steps)
    if step <= warmup:
        return step / warmup
    if cooldown and step > args.steps - cooldown:
        return max(0.0, (args.steps - step + 1) / cooldown)
    return 1.0


def train_run(spec: dict, args: argparse.Namespace, corpus, val: list[torch.Tensor]) -> dict:
    """Trains one configuration and returns its losses and decay statistics."""
    from transformers_mhc import decay_statistics

    model = build_model(spec, args)
    probe = torch.cat(val[: max(1, min(2, len(val)))])
    model.eval()
    init_medians = layer_medians(decay_statistics(model, probe))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i + 1, args))
    generator = torch.Generator().manual_seed(args.seed)  # same data order for every run
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = sample_batch(corpus.train, args.batch, args.seq, generator)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            print(f"[{spec['name']}] non-finite loss at step {step}: stopping this run", flush=True)
            break
    val_loss = evaluate_loss(model, val)
    model.eval()
    stats = decay_statistics(model, probe)
    medians = layer_medians(stats)
    seconds = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10) :]
    print(
        f"[{spec['name']:22s}] val {val_loss:.4f} train(last10%) {sum(tail) / len(tail):.4f} "
        f"median λ per layer {[round(m, 3) for m in medians]} (init {[round(m, 3) for m in init_medians]}) "
        f"({seconds:.0f}s)",
        flush=True,
    )
    return {
        **spec,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_loss": losses,
        "final_train_loss_mean_last_10pct": sum(tail) / len(tail),
        "val_loss": val_loss,
        "decay_median_per_layer": medians,
        "decay_median_per_layer_init": init_medians,
        "decay_median_mean_over_layers": statistics.fmean(medians),
        "decay_median_overall": float(stats["overall"]["median"]) if "overall" in stats else None,
        "decay_statistics": to_jsonable(stats),
        "seconds": seconds,
    }


def to_jsonable(obj):
    """Tensors → lists / floats, recursively, so `decay_statistics` output can be stored as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def markdown_table(runs: list[dict]) -> str:
    """Runs sorted by held-out loss, with the per-layer median decay after training (and at initialisation)."""
    lines = [
        "| rank | decay | granularity | val loss (nats/byte) | train loss (last 10%) | median λ per layer (after) | "
        "mean of medians | median λ per layer (init) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rank, run in enumerate(sorted(runs, key=lambda r: r["val_loss"]), start=1):
        after = ", ".join(f"{m:.3f}" for m in run["decay_median_per_layer"])
        init = ", ".join(f"{m:.3f}" for m in run["decay_median_per_layer_init"])
        label = run["name"].rsplit("/", 1)[0]
        lines.append(
            f"| {rank} | {label} | {run['granularity']} | {run['val_loss']:.4f} | "
            f"{run['final_train_loss_mean_last_10pct']:.4f} | {after} | {run['decay_median_mean_over_layers']:.3f} | "
            f"{init} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Left: held-out loss per run (sorted). Right: per-layer median λ after training, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(results["runs"], key=lambda r: r["val_loss"])
    fig, (ax_loss, ax_decay) = plt.subplots(1, 2, figsize=(15, 5.5))
    colors = ["tab:blue" if r["granularity"] == "scalar" else "tab:orange" for r in runs]
    ax_loss.barh([r["name"] for r in runs], [r["val_loss"] for r in runs], color=colors)
    low = min(r["val_loss"] for r in runs)
    high = max(r["val_loss"] for r in runs)
    ax_loss.set_xlim(low - 0.1 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
    ax_loss.invert_yaxis()
    ax_loss.set_xlabel("held-out loss (nats / byte); blue = scalar, orange = vector")
    ax_loss.set_title("held-out loss after the fixed budget")
    cmap = plt.get_cmap("tab20")
    for i, run in enumerate(runs):
        layers = range(len(run["decay_median_per_layer"]))
        style = "-" if run["granularity"] == "scalar" else "--"
        ax_decay.plot(
            layers, run["decay_median_per_layer"], style, marker="o", color=cmap(i % 20), label=run["name"]
        )
    ax_decay.axhline(0.8, color="black", linewidth=0.8, linestyle=":", label="0.8 (paper's sweet spot)")
    ax_decay.set_xlabel("layer")
    ax_decay.set_ylabel("median λ")
    ax_decay.set_title("per-layer median decay after training (solid scalar, dashed vector)")
    ax_decay.legend(fontsize=7, ncol=2)
    ax_decay.grid(alpha=0.3)
    cfg = results["config"]
    fig.suptitle(
        f"DecayLinearAttn, {cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, seq {cfg['seq']}, "
        f"batch {cfg['batch']}, {cfg['steps']} steps, lr {cfg['lr']:g}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        import transformers_mhc

        transformers_mhc.DecayLinearAttnForCausalLM  # noqa: B018
        transformers_mhc.decay_statistics  # noqa: B018
    except AttributeError as err:
        sys.exit(f"error: the decay model is not available in this transformers_mhc install: {err}")
    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.data_dir, args.max_bytes)
    val = fixed_batches(corpus.val, args.val_batches, args.batch, args.seq, seed=args.seed + 1)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results: dict = {
        "command": "python studies/decay.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": config,
        "corpus": {"path": str(corpus.path), "train_bytes": len(corpus.train), "val_bytes": len(corpus.val)},
        "environment": environment(),
        "runs": [],
    }
    # The committed results the README quotes are replaced only with --overwrite.
    json_path = fresh_path(args.out_dir / "decay.json", overwrite=args.overwrite, companions=(".md", ".png"))
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    start = time.perf_counter()
    for spec in run_specs(args):
        results["runs"].append(train_run(spec, args, corpus, val))
        results["seconds"] = time.perf_counter() - start
        write_json_atomic(json_path, results)  # partial results survive an interrupted run
    table = markdown_table(results["runs"])
    md_path.write_text(table)
    plot(results, png_path)
    print(table)
    print(f"wrote {json_path}, {md_path} and {png_path} ({results['seconds']:.0f}s)")
    return results


if __name__ == "__main__":
    main()
