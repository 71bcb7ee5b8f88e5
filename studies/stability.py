"""Stability study: plain residual vs HC vs mHC under an aggressive learning rate (mHC paper §2, issue 5 item 3).

Trains three versions of the same small deep `MHCForCausalLM` on the Shakespeare corpus (byte level):

- `baseline`: `hyper_connection="none"`, one stream (a plain Pre-Norm residual, i.e. Llama);
- `hc`: unconstrained hyper-connections, `num_streams` streams;
- `mhc`: manifold-constrained hyper-connections (Sinkhorn-projected `h_res`), `num_streams` streams.

Every variant starts from the same seed and sees the same batches in the same order, with AdamW at a constant
learning rate and no warm-up (no gradient clipping unless `--clip` is given). Every step logs the training loss
and the global gradient norm (before clipping); every `--log-every` steps `transformers_mhc.signal_gain` is
measured on a fixed held-out batch (forward = max absolute row sum, backward = max absolute column sum of the
composite `∏ h_res`, maximised over depth) together with the held-out loss.

Outputs `<out-dir>/stability.json` and `<out-dir>/stability.png` (loss, gradient norm, signal gain vs step).

    nice -n 10 python studies/stability.py --steps 200 --lr 1e-2 --log-every 20 --out-dir studies/results

`--quick` runs a tiny configuration (2 layers, hidden 32, a few steps) to check the script end to end.
"""

from __future__ import annotations

import argparse
import math
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
    grad_norm,
    load_corpus,
    sample_batch,
    write_json_atomic,
)

from transformers_mhc import MHCConfig, MHCForCausalLM, signal_gain
from transformers_mhc.outputs import fresh_path

VARIANTS = ("baseline", "hc", "mhc")


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
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--layers", type=int, default=12, help="decoder layers (2 sub-layers each)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 3 x hidden)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--streams", type=int, default=4, help="num_streams of HC and mHC")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--clip", type=float, default=0.0, help="gradient-norm clip (0 = none)")
    parser.add_argument(
        "--log-every", type=int, default=20, help="steps between signal-gain / val measurements"
    )
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--max-bytes", type=int, default=None, help="use only this prefix of the corpus (quick runs)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps, to test the script")
    # --quick changes the defaults only, so explicit flags (e.g. --steps) still win.
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(
            layers=2,
            hidden=32,
            heads=2,
            seq=32,
            batch=2,
            steps=6,
            log_every=3,
            val_batches=1,
            max_bytes=200_000,
        )
    args = parser.parse_args(argv)
    if args.intermediate is None:
        args.intermediate = 3 * args.hidden
    return args


def build_model(variant: str, args: argparse.Namespace) -> MHCForCausalLM:
    """The same architecture for every variant; only the residual connection differs."""
    hyper_connection, streams = ("none", 1) if variant == "baseline" else (variant, args.streams)
    config = MHCConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
        hyper_connection=hyper_connection,
        num_streams=streams,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(args.seed)
    return MHCForCausalLM(config)


def train_variant(variant: str, args: argparse.Namespace, corpus, probe: torch.Tensor, val: list) -> dict:
    """Trains one variant and returns its logged curves."""
    model = build_model(variant, args)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)  # same data order for every variant
    record: dict = {
        "variant": variant,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "steps": [],
        "loss": [],
        "grad_norm": [],
        "eval_steps": [],
        "val_loss": [],
        "gain_forward": [],
        "gain_backward": [],
        "diverged_at_step": None,
    }

    def measure(step: int) -> None:
        model.eval()
        gain = signal_gain(model, probe)
        model.train()
        record["eval_steps"].append(step)
        record["gain_forward"].append(gain["forward"])
        record["gain_backward"].append(gain["backward"])
        record["val_loss"].append(evaluate_loss(model, val))
        record["final_per_layer_gain"] = gain["per_layer"]

    start = time.perf_counter()
    measure(0)
    for step in range(1, args.steps + 1):
        batch = sample_batch(corpus.train, args.batch, args.seq, generator)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = grad_norm(model)
        record["steps"].append(step)
        record["loss"].append(loss.item())
        record["grad_norm"].append(norm)
        if not (math.isfinite(record["loss"][-1]) and math.isfinite(norm)):
            record["diverged_at_step"] = step
            print(f"[{variant}] non-finite loss/gradient at step {step}: stopping this variant", flush=True)
            break
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps:
            measure(step)
            print(
                f"[{variant}] step {step:5d} loss {record['loss'][-1]:.4f} val {record['val_loss'][-1]:.4f} "
                f"grad {norm:.3f} gain fwd {record['gain_forward'][-1]:.3f} "
                f"bwd {record['gain_backward'][-1]:.3f} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    record["seconds"] = time.perf_counter() - start
    tail = record["loss"][-max(1, len(record["loss"]) // 10) :]
    record["summary"] = {
        "final_train_loss_mean_last_10pct": sum(tail) / len(tail),
        "final_val_loss": record["val_loss"][-1],
        "best_val_loss": min(record["val_loss"]),
        "max_gain_forward": max(record["gain_forward"]),
        "max_gain_backward": max(record["gain_backward"]),
        "final_gain_forward": record["gain_forward"][-1],
        "final_gain_backward": record["gain_backward"][-1],
        "max_grad_norm": max(record["grad_norm"]),
        "median_grad_norm": sorted(record["grad_norm"])[len(record["grad_norm"]) // 2],
        "loss_spikes": count_spikes(record["loss"]),
    }
    return record


def count_spikes(losses: list[float], window: int = 20, factor: float = 1.2) -> int:
    """Steps whose loss exceeds `factor` × the median of the previous `window` losses (a crude spike count)."""
    spikes = 0
    for i in range(window, len(losses)):
        previous = sorted(losses[i - window : i])
        if losses[i] > factor * previous[window // 2]:
            spikes += 1
    return spikes


def plot(results: dict, path: Path) -> None:
    """Three panels: training loss, gradient norm and signal gain (forward solid, backward dashed) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"baseline": "tab:gray", "hc": "tab:red", "mhc": "tab:blue"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for variant, record in results["variants"].items():
        c = colors[variant]
        axes[0].plot(record["steps"], record["loss"], color=c, alpha=0.35, linewidth=0.7)
        axes[0].plot(
            record["eval_steps"], record["val_loss"], color=c, marker="o", markersize=3, label=variant
        )
        axes[1].plot(record["steps"], record["grad_norm"], color=c, alpha=0.8, linewidth=0.7, label=variant)
        axes[2].plot(record["eval_steps"], record["gain_forward"], color=c, label=f"{variant} forward")
        axes[2].plot(
            record["eval_steps"],
            record["gain_backward"],
            color=c,
            linestyle="--",
            label=f"{variant} backward",
        )
    axes[0].set_title("loss (thin: train, markers: held-out)")
    axes[0].set_ylabel("nats / byte")
    axes[1].set_title("gradient norm (before clipping)")
    axes[1].set_yscale("log")
    axes[2].set_title("signal gain of ∏ h_res (max over depth)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(
        f"{cfg['layers']} layers ({2 * cfg['layers']} sub-layers), hidden {cfg['hidden']}, n={cfg['streams']}, "
        f"seq {cfg['seq']}, batch {cfg['batch']}, AdamW lr {cfg['lr']:g} constant, no warm-up, "
        f"clip {cfg['clip'] or 'none'}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.data_dir, args.max_bytes)
    val = fixed_batches(corpus.val, args.val_batches, args.batch, args.seq, seed=args.seed + 1)
    probe = val[0]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results: dict = {
        "command": "python studies/stability.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": config,
        "corpus": {"path": str(corpus.path), "train_bytes": len(corpus.train), "val_bytes": len(corpus.val)},
        "environment": environment(),
        "variants": {},
    }
    # The committed results the README quotes are replaced only with --overwrite.
    json_path = fresh_path(args.out_dir / "stability.json", overwrite=args.overwrite, companions=(".png",))
    png_path = json_path.with_suffix(".png")
    for variant in args.variants:
        results["variants"][variant] = train_variant(variant, args, corpus, probe, val)
        write_json_atomic(json_path, results)  # partial results survive an interrupted run
    plot(results, png_path)
    for variant, record in results["variants"].items():
        s = record["summary"]
        print(
            f"{variant:8s} final val {s['final_val_loss']:.4f} train(last10%) "
            f"{s['final_train_loss_mean_last_10pct']:.4f} max gain fwd {s['max_gain_forward']:.3f} "
            f"bwd {s['max_gain_backward']:.3f} max grad {s['max_grad_norm']:.2f} "
            f"diverged {record['diverged_at_step']} ({record['seconds']:.0f}s)"
        )
    print(f"wrote {json_path} and {png_path}")
    return results


if __name__ == "__main__":
    main()
