"""Recall study: which token mixers solve induction heads and multi-query associative recall (issue 12, items 3-4).

Trains small 2-layer models on the two synthetic recall tasks of `transformers_mhc.evaluation.synthetic`
(`induction_batch`, `mqar_batch`; training and evaluation with its `train_recall` / `recall_accuracy`) for the
designs in `DESIGNS`: softmax attention (Llama), linear attention without decay, Simple Decay (p = 0.99) without
and with the short convolution (H3's shift SSM), Mamba2-style decay with the short conv, the delta rule with
Mamba2-style decay and the short conv (Gated-DeltaNet-like), H3 with and without its shift SSM, and the diagonal
SSM alone (S4D). Every design gets the same budget (steps x batch) per task, and parameter counts are matched as
far as the configs allow (the MLP of Llama and of the diagonal SSM alone is widened to make up for the decay
model's gates and for the missing q/k projections; the counts are reported).

Learning rate: each design is trained at every `--lrs` value with the first seed; the learning rate with the best
accuracy (ties: lower final training loss) is then trained with the remaining seeds, and the table reports the
accuracy over all seeds at that learning rate (mean, std, min, max). `--lr-selection all` trains every seed at every
learning rate and picks the best mean instead (3x the cost of the other seeds).

MQAR is trained at one key-value count (`--mqar-kv`) and each trained model is also evaluated at the other counts
of `--mqar-eval-kv` (fewer pairs, and more than it was trained on).

Outputs `<out-dir>/recall.json`, `<out-dir>/recall.md` (the table) and `<out-dir>/recall.png`; existing results are
kept (new files are written beside them as `recall-2.*`) unless `--overwrite`. `--append` instead adds the designs
of this run to the existing `<out-dir>/recall.json` (same settings required; its rows are kept) and rewrites the
table and plot from all of them. Every finished training run is saved in the JSON at once, so an interrupted
`--append` resumes when run again: the runs it recorded are reused, not retrained:

    nice -n 10 python studies/recall.py --out-dir studies/results
    nice -n 10 python studies/recall.py --out-dir studies/results --append --designs h3 h3_noshift s4d

Adding a design is one `Design(...)` entry in `DESIGNS`, or, without editing,
`--add-design 'h3=decay_linear_attn:{"token_mixer": "h3", "short_conv_size": 4}'`. Its config fields are
passed through as they are; a design whose config or model raises, or that names a field the config class does
not have (which `PretrainedConfig` would otherwise store and ignore), is skipped with a message and listed under
`skipped` in the JSON.

`--quick` runs a tiny configuration (a few steps) to check the script end to end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import environment, save_figure, write_json_atomic

from transformers_mhc.evaluation.synthetic import (
    TrainSettings,
    build_config,
    mqar_batch,
    recall_accuracy,
    train_recall,
)
from transformers_mhc.outputs import fresh_path


@dataclass(frozen=True)
class Design:
    """One token-mixer design: a short key, a label, the model family and the config fields that define it."""

    key: str
    label: str
    arch: str  # an `arch` of `build_config`: "llama", "mhc" or "decay_linear_attn"
    config: dict[str, Any] = field(default_factory=dict)


SHORT_CONV = {"short_conv_size": 4}
# One entry per design. Config fields are passed to the config class unchanged.
DESIGNS: tuple[Design, ...] = (
    # Llama's MLP is widened (128 -> 152 at hidden 64) to match the decay model's extra gate parameters.
    Design("softmax", "softmax attention (Llama)", "llama", {"intermediate_size_factor": 2.375}),
    Design("linear", "linear attention, no decay", "decay_linear_attn", {"decay_type": "none"}),
    Design(
        "simple",
        "Simple Decay p=0.99",
        "decay_linear_attn",
        {"decay_type": "simple", "simple_decay_init": 0.99},
    ),
    Design(
        "simple_conv",
        "Simple Decay p=0.99 + short conv",
        "decay_linear_attn",
        {"decay_type": "simple", "simple_decay_init": 0.99, **SHORT_CONV},
    ),
    Design(
        "mamba2_conv",
        "Mamba2 decay + short conv",
        "decay_linear_attn",
        {"decay_type": "mamba2", **SHORT_CONV},
    ),
    Design(
        "delta_conv",
        "delta rule + Mamba2 decay + short conv",
        "decay_linear_attn",
        {"decay_type": "mamba2", "use_delta_rule": True, **SHORT_CONV},
    ),
    # H3's shift SSM is the short conv on k (`short_conv_size`); the diagonal SSM has h3_state_size = 64 (32 modes).
    Design("h3", "H3 (shift + diagonal SSM)", "decay_linear_attn", {"token_mixer": "h3", **SHORT_CONV}),
    Design("h3_noshift", "H3 without the shift SSM", "decay_linear_attn", {"token_mixer": "h3"}),
    # The diagonal SSM alone has no q and k projections: its MLP is widened (128 -> 150) to make up for them.
    Design(
        "s4d",
        "diagonal SSM alone (S4D)",
        "decay_linear_attn",
        {"token_mixer": "s4d", "intermediate_size_factor": 150 / 64},
    ),
)
# Study-level keys that are not config fields: resolved against the model width before the config is built.
WIDTH_FACTORS = {"intermediate_size_factor": "intermediate_size"}


def parse_design(text: str) -> Design:
    """`KEY=ARCH:{json config fields}` (ARCH optional, default decay_linear_attn) -> a `Design`."""
    key, sep, rest = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=ARCH:{{json}}, got {text!r}")
    arch, colon, fields = rest.partition(":")
    if not colon or arch.lstrip().startswith("{"):
        arch, fields = "decay_linear_attn", rest
    try:
        config = json.loads(fields)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: the config fields are not JSON: {err}") from err
    if not isinstance(config, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: the config fields must be a JSON object")
    return Design(key, key, arch.strip(), config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing result files (default: write beside them as recall-2.json, ...)",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add this run's designs to the existing <out-dir>/recall.json (same settings) and rewrite its table",
    )
    keys = [d.key for d in DESIGNS]
    parser.add_argument("--designs", nargs="+", choices=keys, default=keys)
    parser.add_argument(
        "--add-design",
        action="append",
        type=parse_design,
        default=[],
        metavar="KEY=ARCH:JSON",
        help="an extra design, e.g. 'h3=decay_linear_attn:{\"short_conv_size\": 4, ...}' (repeatable)",
    )
    parser.add_argument("--tasks", nargs="+", choices=("induction", "mqar"), default=["induction", "mqar"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument(
        "--lr-selection",
        choices=("first-seed", "all"),
        default="first-seed",
        help="pick the learning rate on the first seed (default) or on the mean over all seeds",
    )
    parser.add_argument("--induction-seq", type=int, default=32)
    parser.add_argument("--induction-vocab", type=int, default=32)
    parser.add_argument("--induction-steps", type=int, default=300)
    parser.add_argument("--induction-batch", type=int, default=64)
    parser.add_argument("--mqar-seq", type=int, default=64)
    parser.add_argument("--mqar-vocab", type=int, default=64)
    parser.add_argument("--mqar-kv", type=int, default=8, help="key-value pairs per training example")
    parser.add_argument("--mqar-eval-kv", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--mqar-steps", type=int, default=200)
    parser.add_argument("--mqar-batch", type=int, default=32)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warm-up")
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps, to test the script")
    # --quick changes the defaults only, so explicit flags still win.
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(
            hidden=32,
            seeds=[0, 1],
            lrs=[3e-3, 1e-2],
            induction_seq=16,
            induction_steps=3,
            induction_batch=4,
            mqar_seq=32,
            mqar_kv=4,
            mqar_eval_kv=[2, 4],
            mqar_steps=3,
            mqar_batch=4,
            eval_examples=16,
        )
    return parser.parse_args(argv)


def task_settings(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """Sequence length, vocabulary, kv pairs and budget of one task."""
    if task == "induction":
        return {
            "seq_len": args.induction_seq,
            "vocab_size": args.induction_vocab,
            "num_kv_pairs": None,
            "steps": args.induction_steps,
            "batch_size": args.induction_batch,
        }
    return {
        "seq_len": args.mqar_seq,
        "vocab_size": args.mqar_vocab,
        "num_kv_pairs": args.mqar_kv,
        "eval_kv": sorted(set(args.mqar_eval_kv) | {args.mqar_kv}),
        "steps": args.mqar_steps,
        "batch_size": args.mqar_batch,
    }


def design_config(design: Design, task: dict[str, Any], args: argparse.Namespace):
    """The design's config for `task`; raises ValueError for a field the config class does not define."""
    fields = dict(design.config)
    for factor, name in WIDTH_FACTORS.items():
        if factor in fields:
            fields[name] = round(fields.pop(factor) * args.hidden)
    config = build_config(
        design.arch,
        vocab_size=task["vocab_size"],
        d_model=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        max_seq_len=task["seq_len"],
        overrides=fields,
    )
    known = {f.name for f in dataclasses.fields(type(config))} if dataclasses.is_dataclass(config) else None
    unknown = sorted(set(fields) - known) if known is not None else []
    if unknown:
        raise ValueError(f"{type(config).__name__} has no field {', '.join(unknown)} (it would be ignored)")
    return config


def build_model(design: Design, task: dict[str, Any], args: argparse.Namespace, seed: int):
    from transformers import AutoModelForCausalLM

    config = design_config(design, task, args)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def train_one(
    design: Design, task_name: str, task: dict, args: argparse.Namespace, lr: float, seed: int
) -> dict:
    """Trains one model and returns its accuracy (per evaluated kv count for MQAR)."""
    model = build_model(design, task, args, seed)
    settings = TrainSettings(
        steps=task["steps"],
        batch_size=task["batch_size"],
        lr=lr,
        weight_decay=args.weight_decay,
        warmup_steps=max(1, round(args.warmup * task["steps"])),
        eval_examples=args.eval_examples,
        seed=seed,
    )
    result = train_recall(
        model,
        task_name,
        seq_len=task["seq_len"],
        num_kv_pairs=task["num_kv_pairs"],
        vocab_size=task["vocab_size"],
        settings=settings,
    )
    run = {"design": design.key, "task": task_name, "lr": lr, "seed": seed, **result}
    if task_name == "mqar":
        run["accuracy_by_kv"] = {}
        for kv in task["eval_kv"]:  # the trained count is train_recall's own held-out accuracy
            if kv == task["num_kv_pairs"]:
                run["accuracy_by_kv"][str(kv)] = result["accuracy"]
            else:
                batch = mqar_batch(
                    args.eval_examples, task["seq_len"], kv, task["vocab_size"], seed=20_000 + seed
                )
                run["accuracy_by_kv"][str(kv)] = recall_accuracy(model, batch)
    print(
        f"[{task_name:9s} {design.key:12s} lr {lr:g} seed {seed}] accuracy {result['accuracy']:.3f} "
        f"loss {result['final_loss']:.3f} ({result['train_seconds']:.0f}s)",
        flush=True,
    )
    return run


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def pick_lr(runs: list[dict], lrs: list[float], seeds: list[int]) -> float:
    """Best mean accuracy over `seeds` (ties: lower mean final loss)."""

    def score(lr: float) -> tuple[float, float]:
        chosen = [r for r in runs if r["lr"] == lr and r["seed"] in seeds]
        return (
            statistics.fmean(r["accuracy"] for r in chosen),
            -statistics.fmean(r["final_loss"] for r in chosen),
        )

    return max(lrs, key=score)


def study_design(
    design: Design, task_name: str, task: dict, args: argparse.Namespace, record, recorded: list[dict]
) -> dict:
    """The learning-rate sweep and the seeds at the chosen learning rate, for one design and task. A run already in
    `recorded` (by an interrupted `--append` with the same settings) is reused instead of trained again."""
    first, rest = args.seeds[0], args.seeds[1:]
    sweep_seeds = args.seeds if args.lr_selection == "all" else [first]

    def run(lr: float, seed: int) -> dict:
        key = (design.key, task_name, lr, seed)
        for previous in recorded:
            if (previous["design"], previous["task"], previous["lr"], previous["seed"]) == key:
                print(f"[{task_name:9s} {design.key:12s} lr {lr:g} seed {seed}] recorded earlier", flush=True)
                return previous
        return record(train_one(design, task_name, task, args, lr, seed))

    runs = [run(lr, seed) for lr in args.lrs for seed in sweep_seeds]
    best = pick_lr(runs, args.lrs, sweep_seeds)
    if args.lr_selection == "first-seed":
        runs += [run(best, seed) for seed in rest]
    at_best = [r for r in runs if r["lr"] == best]
    summary = {
        "design": design.key,
        "task": task_name,
        "best_lr": best,
        "accuracy": spread([r["accuracy"] for r in at_best]),
        "first_seed_accuracy_by_lr": {
            f"{lr:g}": next(r["accuracy"] for r in runs if r["lr"] == lr and r["seed"] == first)
            for lr in args.lrs
        },
    }
    if task_name == "mqar":
        summary["accuracy_by_kv"] = {
            kv: spread([r["accuracy_by_kv"][kv] for r in at_best]) for kv in at_best[0]["accuracy_by_kv"]
        }
    return summary


def fmt(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def markdown_table(results: dict) -> str:
    """One row per design: parameters, and per task the best learning rate and accuracy mean ± std [min, max]."""
    tasks = results["config"]["tasks"]
    by_key = {(s["design"], s["task"]): s for s in results["summary"]}
    header = ["design", "params (" + " / ".join(tasks) + ")"]
    for task in tasks:
        if task == "mqar":
            kvs = results["tasks"]["mqar"]["eval_kv"]
            trained = results["tasks"]["mqar"]["num_kv_pairs"]
            header += ["MQAR best lr"] + [
                f"MQAR kv={kv}" + (" (trained)" if kv == trained else "") for kv in kvs
            ]
        else:
            header += ["induction best lr", "induction"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for design in results["designs"]:
        counts = design["num_parameters"]
        params = " / ".join(f"{counts[task] / 1000:.1f}k" if task in counts else "—" for task in tasks)
        row = [design["label"], params]
        for task in tasks:
            summary = by_key.get((design["key"], task))
            width = 1 + (len(results["tasks"]["mqar"]["eval_kv"]) if task == "mqar" else 1)
            if summary is None:
                row += ["—"] * width
            elif task == "mqar":
                kvs = results["tasks"]["mqar"]["eval_kv"]
                row += [f"{summary['best_lr']:g}"] + [fmt(summary["accuracy_by_kv"][str(kv)]) for kv in kvs]
            else:
                row += [f"{summary['best_lr']:g}", fmt(summary["accuracy"])]
        lines.append("| " + " | ".join(row) + " |")
    for skipped in results["skipped"]:
        lines.append(f"\nSkipped {skipped['design']}: {skipped['reason']}")
    seeds = results["config"]["seeds"]
    lines.append(
        f"\nAccuracy: mean ± std [min, max] over seeds {seeds} at the best learning rate of {results['config']['lrs']} "
        f"(chosen on {'the first seed' if results['config']['lr_selection'] == 'first-seed' else 'all seeds'})."
    )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """One panel per evaluated setting: mean accuracy per design, whiskers at min and max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for summary in results["summary"]:
        if summary["task"] == "mqar":
            panels += [(f"MQAR kv={kv}", summary, s) for kv, s in summary["accuracy_by_kv"].items()]
        else:
            panels.append(("induction", summary, summary["accuracy"]))
    names = list(dict.fromkeys(title for title, _, _ in panels))
    labels = {d["key"]: d["label"] for d in results["designs"]}
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        rows = [(summary, s) for title, summary, s in panels if title == name]
        means = [s["mean"] for _, s in rows]
        errors = [[s["mean"] - s["min"] for _, s in rows], [s["max"] - s["mean"] for _, s in rows]]
        ax.barh(range(len(rows)), means, xerr=errors, color="tab:blue", capsize=3)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(
            [f"{labels[summary['design']]} (lr {summary['best_lr']:g})" for summary, _ in rows], fontsize=7
        )
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(name)
        ax.set_xlabel("accuracy (mean, whiskers min-max over seeds)")
    cfg = results["config"]
    fig.suptitle(
        f"Recall: {cfg['layers']} layers, hidden {cfg['hidden']}, {cfg['heads']} heads, seeds {cfg['seeds']}"
    )
    save_figure(fig, path)


# Settings that do not change what is measured: an appended run may differ from the existing results in these.
RUN_ONLY_SETTINGS = {"out_dir", "overwrite", "append", "designs", "threads", "tasks"}


def appended_results(path: Path, results: dict, designs: list[Design]) -> dict:
    """The existing results at `path`, to which this run's designs are added (`--append`), for all or some of the
    tasks (a design's other tasks may be appended by a later run; until then their cells read "—").

    Refuses (SystemExit) when a measured setting differs or a design already has a result for one of this run's
    tasks, so that rows measured under different protocols never share a table and no existing result is replaced.
    """
    if not path.exists():
        raise SystemExit(f"--append: {path} does not exist")
    existing = json.loads(path.read_text())
    differ = {
        key: (existing["config"].get(key), value)
        for key, value in results["config"].items()
        if key not in RUN_ONLY_SETTINGS and existing["config"].get(key) != value
    }
    differ.update(
        {
            task: "task settings"
            for task, settings in results["tasks"].items()
            if existing["tasks"].get(task) != settings
        }
    )
    if differ:
        raise SystemExit(f"--append: settings differ from {path} (existing, this run): {differ}")
    done = {(s["design"], s["task"]) for s in existing["summary"]}
    present = sorted(f"{d.key}/{task}" for d in designs for task in results["tasks"] if (d.key, task) in done)
    if present:
        raise SystemExit(f"--append: {path} already has {', '.join(present)}")
    keys = existing["config"]["designs"]
    existing["config"]["designs"] = keys + [d.key for d in designs if d.key not in keys]
    existing.setdefault("appended", []).append(
        {"command": results["command"], "environment": results["environment"], "seconds": 0.0}
    )
    return existing


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    designs = [d for d in DESIGNS if d.key in args.designs] + args.add_design
    tasks = {name: task_settings(name, args) for name in args.tasks}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "add_design"}
    results: dict = {
        "command": "python studies/recall.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": config,
        "tasks": tasks,
        "environment": environment(),
        "designs": [],
        "skipped": [],
        "runs": [],
        "summary": [],
    }
    if args.append:
        json_path = args.out_dir / "recall.json"
        results = appended_results(json_path, results, designs)
    else:
        json_path = fresh_path(
            args.out_dir / "recall.json", overwrite=args.overwrite, companions=(".md", ".png")
        )
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    earlier_seconds = results.get("seconds", 0.0)
    recorded = list(results["runs"])  # runs of an interrupted --append are reused

    def record(run: dict) -> dict:
        results["runs"].append(run)
        update_seconds()
        write_json_atomic(json_path, results)  # partial results survive an interrupted run
        return run

    def update_seconds() -> None:
        # The total over every run in the file; an appended run's own time is kept in its `appended` entry.
        elapsed = time.perf_counter() - start
        results["seconds"] = earlier_seconds + elapsed
        if args.append:
            results["appended"][-1]["seconds"] = elapsed

    start = time.perf_counter()
    for design in designs:
        try:  # a design the installed package cannot build yet is skipped, not fatal
            counts = {
                name: sum(p.numel() for p in build_model(design, task, args, 0).parameters())
                for name, task in tasks.items()
            }
        except Exception as err:  # noqa: BLE001 - any config/model error means "not available here"
            reason = f"{type(err).__name__}: {err}"
            print(f"skipping design {design.key!r} ({design.label}): {reason}", file=sys.stderr, flush=True)
            results["skipped"].append({"design": design.key, "config": design.config, "reason": reason})
            continue
        entry = next((d for d in results["designs"] if d["key"] == design.key), None)
        if entry is None:
            results["designs"].append({**dataclasses.asdict(design), "num_parameters": counts})
        else:  # appending another task of a design already in the results
            entry["num_parameters"].update(counts)
        for name, task in tasks.items():
            results["summary"].append(study_design(design, name, task, args, record, recorded))
    update_seconds()
    write_json_atomic(json_path, results)
    table = markdown_table(results)
    md_path.write_text(table)
    if results["summary"]:
        plot(results, png_path)
    print(table)
    print(f"wrote {json_path}, {md_path} and {png_path} ({results['seconds']:.0f}s)")
    return results


if __name__ == "__main__":
    main()
