"""Synthetic recall tasks: multi-query associative recall (MQAR) and induction heads.

Both generators return ``input_ids`` and ``labels`` of shape ``(num_examples, seq_len)`` where
``labels[:, t]`` is the token the model must predict *at* position ``t`` (the next token), and
``-100`` wherever nothing is asked. The labels are therefore already shifted: use them with
``cross_entropy(logits.flatten(0, 1), labels.flatten())``, not with the shifting loss of a
``*ForCausalLM`` ``forward(labels=...)``.

MQAR follows Zoology (Arora et al., 2023): ``num_kv_pairs`` key-value pairs first (keys from
``[1, V/2)``, values from ``[V/2, V)``, all distinct within an example), then each key queried once
at an even offset of the remaining positions (offsets drawn with a power law favouring short gaps),
filler tokens elsewhere; the label at a query is the value paired with that key.

Induction heads: random tokens, a trigger token (``V - 1``) followed by a target somewhere, and the
trigger again at the last position, where the label is that target.

``transformers-mhc synthetic`` trains small models (Llama baseline, MHC, decay linear attention) for
a fixed number of steps on CPU and reports accuracy on held-out examples per setting, as JSON and a
PNG plot.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from transformers_mhc.evaluation.io_utils import write_atomic

IGNORE_INDEX = -100
TASKS = ("mqar", "induction")
ARCHS = ("llama", "mhc", "decay_linear_attn")
# Zoology's MQAR grid (sequence length, kv pairs).
ZOOLOGY_MQAR_SETTINGS = ((64, 4), (128, 8), (256, 16), (256, 32), (256, 64))


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    generator = torch.Generator()
    generator.manual_seed(0 if seed is None else seed)
    return generator


def _distinct_draws(
    num_examples: int, low: int, high: int, count: int, generator: torch.Generator
) -> torch.Tensor:
    """``count`` distinct integers from ``[low, high)`` per row (a random permutation's prefix)."""
    return torch.rand(num_examples, high - low, generator=generator).argsort(dim=1)[:, :count] + low


def mqar_batch(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    *,
    power_a: float = 0.01,
    seed: int | torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Multi-query associative recall examples (Zoology).

    Args:
        num_examples: batch size.
        seq_len: tokens per example; needs ``seq_len >= 4 * num_kv_pairs`` (the pairs, plus one
            query slot at an even offset per pair).
        num_kv_pairs: key-value pairs per example (each key is queried once).
        vocab_size: keys come from ``[1, V/2)``, values from ``[V/2, V)``; filler from ``[1, V)``.
        power_a: exponent of the power law ``p(gap) ∝ gap^(a-1)`` placing the queries (Zoology: 0.01).
        seed: an int or a ``torch.Generator`` (the same seed gives the same examples).

    Returns:
        ``{"input_ids", "labels"}``, both ``int64`` of shape ``(num_examples, seq_len)``.
    """
    half = vocab_size // 2
    if num_kv_pairs < 1 or half - 1 < num_kv_pairs or vocab_size - half < num_kv_pairs:
        raise ValueError(
            f"num_kv_pairs={num_kv_pairs} needs 1 <= num_kv_pairs <= vocab_size/2 - 1 (vocab_size={vocab_size})"
        )
    context = 2 * num_kv_pairs
    slots = (seq_len - context) // 2  # query positions: even offsets after the pairs
    if slots < num_kv_pairs:
        raise ValueError(
            f"seq_len={seq_len} is too short for {num_kv_pairs} kv pairs (need >= {4 * num_kv_pairs})"
        )
    generator = _generator(seed)
    keys = _distinct_draws(num_examples, 1, half, num_kv_pairs, generator)
    values = _distinct_draws(num_examples, half, vocab_size, num_kv_pairs, generator)

    input_ids = torch.randint(1, vocab_size, (num_examples, seq_len), generator=generator)
    input_ids[:, 0:context:2] = keys
    input_ids[:, 1:context:2] = values

    gaps = torch.arange(1, slots + 1, dtype=torch.float64)
    weights = (power_a * gaps ** (power_a - 1)).expand(num_examples, slots)
    # Key i goes to slot gap_i; distinct slots, so every key is asked exactly once.
    slot = torch.multinomial(weights, num_kv_pairs, replacement=False, generator=generator)
    positions = context + 2 * slot
    labels = torch.full((num_examples, seq_len), IGNORE_INDEX, dtype=torch.long)
    input_ids.scatter_(1, positions, keys)
    labels.scatter_(1, positions, values)
    return {"input_ids": input_ids, "labels": labels}


def induction_batch(
    num_examples: int,
    seq_len: int,
    vocab_size: int,
    *,
    seed: int | torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Induction-head examples: ``... T x ... T`` -> predict ``x`` after the final trigger ``T``.

    The trigger is token ``vocab_size - 1`` and appears exactly twice; every other token (including the
    target ``x``) is drawn from ``[1, vocab_size - 1)``. Only the last position is labelled.

    Returns:
        ``{"input_ids", "labels"}``, both ``int64`` of shape ``(num_examples, seq_len)``.
    """
    if seq_len < 3 or vocab_size < 3:
        raise ValueError(f"induction needs seq_len >= 3 and vocab_size >= 3, got {seq_len}, {vocab_size}")
    generator = _generator(seed)
    trigger = vocab_size - 1
    input_ids = torch.randint(1, trigger, (num_examples, seq_len), generator=generator)
    first = torch.randint(
        0, seq_len - 2, (num_examples, 1), generator=generator
    )  # target at first + 1 < T - 1
    rows = torch.arange(num_examples)
    input_ids[rows, first[:, 0]] = trigger
    input_ids[:, -1] = trigger
    labels = torch.full((num_examples, seq_len), IGNORE_INDEX, dtype=torch.long)
    labels[:, -1] = input_ids[rows, first[:, 0] + 1]
    return {"input_ids": input_ids, "labels": labels}


def make_batch(
    task: str, num_examples: int, seq_len: int, num_kv_pairs: int | None, vocab_size: int, seed
) -> dict[str, torch.Tensor]:
    """Dispatch to :func:`mqar_batch` or :func:`induction_batch`."""
    if task == "mqar":
        if num_kv_pairs is None:
            raise ValueError("mqar needs num_kv_pairs")
        return mqar_batch(num_examples, seq_len, num_kv_pairs, vocab_size, seed=seed)
    if task == "induction":
        return induction_batch(num_examples, seq_len, vocab_size, seed=seed)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# ----------------------------------------------------------------------------- models


def build_config(
    arch: str,
    *,
    vocab_size: int,
    d_model: int,
    num_layers: int,
    num_heads: int,
    max_seq_len: int,
    overrides: Mapping[str, Any] | None = None,
):
    """A small config for ``arch``: ``transformers.LlamaConfig`` or our ``MHCConfig`` /
    ``DecayLinearAttnConfig`` (imported here, so the module works before those exist), with the
    Llama-style sizes every one of them takes. ``overrides`` sets any other config field."""
    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": d_model,
        "intermediate_size": 2 * d_model,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "max_position_embeddings": max_seq_len,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    if arch == "llama":
        from transformers import LlamaConfig as config_class
    elif arch == "mhc":
        from transformers_mhc import MHCConfig as config_class
    elif arch == "decay_linear_attn":
        from transformers_mhc import DecayLinearAttnConfig as config_class
    else:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return config_class(**{**sizes, **(overrides or {})})


def _recall_logits(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the labelled positions only (the vocabulary projection dominates the cost otherwise).

    Uses the decoder and output projection when the model exposes them the standard way, else the
    full forward pass.
    """
    base, head = model.base_model, model.get_output_embeddings()
    if base is not model and head is not None:
        hidden = base(input_ids=input_ids).last_hidden_state
        return head(hidden[mask])
    return model(input_ids=input_ids).logits[mask]


@dataclass
class TrainSettings:
    """Optimisation settings shared by every run of a sweep."""

    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    eval_examples: int = 1000
    seed: int = 0


def train_recall(
    model: torch.nn.Module,
    task: str,
    *,
    seq_len: int,
    num_kv_pairs: int | None,
    vocab_size: int,
    settings: TrainSettings,
) -> dict[str, Any]:
    """Train ``model`` on fresh batches for ``settings.steps`` steps (AdamW, linear warm-up then cosine
    decay) and return accuracy at the labelled positions of ``settings.eval_examples`` held-out ones."""
    torch.manual_seed(settings.seed)
    train_gen = _generator(settings.seed)
    eval_batch = make_batch(
        task, settings.eval_examples, seq_len, num_kv_pairs, vocab_size, seed=10_000 + settings.seed
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    def lr_factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    start = time.perf_counter()
    losses = []
    for _ in range(settings.steps):
        batch = make_batch(task, settings.batch_size, seq_len, num_kv_pairs, vocab_size, seed=train_gen)
        mask = batch["labels"] != IGNORE_INDEX
        loss = F.cross_entropy(_recall_logits(model, batch["input_ids"], mask), batch["labels"][mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    train_seconds = time.perf_counter() - start
    accuracy = recall_accuracy(model, eval_batch, batch_size=max(settings.batch_size, 256))
    tail = losses[-max(1, len(losses) // 10) :]
    return {"accuracy": accuracy, "final_loss": sum(tail) / len(tail), "train_seconds": train_seconds}


@torch.no_grad()
def recall_accuracy(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], batch_size: int = 256
) -> float:
    """Fraction of labelled positions where the model's top token is the label."""
    model.eval()
    correct = total = 0
    for start in range(0, batch["input_ids"].shape[0], batch_size):
        input_ids = batch["input_ids"][start : start + batch_size]
        labels = batch["labels"][start : start + batch_size]
        mask = labels != IGNORE_INDEX
        predictions = _recall_logits(model, input_ids, mask).argmax(-1)
        correct += (predictions == labels[mask]).sum().item()
        total += mask.sum().item()
    return correct / total


@dataclass
class SyntheticRun:
    """One trained model: architecture, width, task setting and its result."""

    arch: str
    task: str
    d_model: int
    seq_len: int
    num_kv_pairs: int | None
    accuracy: float
    final_loss: float
    train_seconds: float
    num_parameters: int
    config_overrides: dict[str, Any] = field(default_factory=dict)


def run_synthetic(
    archs: Sequence[str],
    task: str,
    settings: Sequence[tuple[int, int | None]],
    *,
    d_models: Sequence[int] = (128,),
    num_layers: int = 2,
    num_heads: int = 1,
    vocab_size: int = 256,
    train: TrainSettings | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> list[SyntheticRun]:
    """Train one fresh model per (arch, d_model, setting) and evaluate it.

    Args:
        archs: any of ``llama``, ``mhc``, ``decay_linear_attn``.
        task: ``mqar`` or ``induction``.
        settings: ``(seq_len, num_kv_pairs)`` pairs (``num_kv_pairs`` is ignored for induction).
        d_models, num_layers, num_heads, vocab_size: model sizes.
        train: optimisation settings (steps, batch size, lr, ...).
        config_overrides: extra config fields for every model (e.g. ``{"num_streams": 4}``).
    """
    from transformers import AutoModelForCausalLM

    train = train or TrainSettings()
    runs = []
    max_seq_len = max(seq_len for seq_len, _ in settings)
    for arch in archs:
        for d_model in d_models:
            for seq_len, num_kv_pairs in settings:
                kv = num_kv_pairs if task == "mqar" else None
                config = build_config(
                    arch,
                    vocab_size=vocab_size,
                    d_model=d_model,
                    num_layers=num_layers,
                    num_heads=num_heads,
                    max_seq_len=max_seq_len,
                    overrides=config_overrides,
                )
                torch.manual_seed(train.seed)
                model = AutoModelForCausalLM.from_config(config)
                result = train_recall(
                    model, task, seq_len=seq_len, num_kv_pairs=kv, vocab_size=vocab_size, settings=train
                )
                run = SyntheticRun(
                    arch=arch,
                    task=task,
                    d_model=d_model,
                    seq_len=seq_len,
                    num_kv_pairs=kv,
                    num_parameters=sum(p.numel() for p in model.parameters()),
                    config_overrides=dict(config_overrides or {}),
                    **result,
                )
                runs.append(run)
                if progress:
                    setting = f"T={seq_len}" + (f" kv={kv}" if kv else "")
                    print(
                        f"{arch} d={d_model} {setting}: accuracy {run.accuracy:.3f} "
                        f"(loss {run.final_loss:.3f}, {run.train_seconds:.0f}s)",
                        file=sys.stderr,
                    )
    return runs


def plot_runs(runs: Sequence[SyntheticRun], title: str) -> bytes:
    """PNG of accuracy per setting (x: sequence length / kv pairs), one line per (arch, d_model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r.seq_len, r.num_kv_pairs or 0) for r in runs})
    labels = [f"{t}\nkv={kv}" if kv else str(t) for t, kv in settings]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(settings) + 2), 4))
    markers = "osD^vP*X"  # distinct and shrinking, so that lines on the same points stay visible
    for number, (arch, d_model) in enumerate(sorted({(r.arch, r.d_model) for r in runs})):
        points = {
            (r.seq_len, r.num_kv_pairs or 0): r.accuracy
            for r in runs
            if (r.arch, r.d_model) == (arch, d_model)
        }
        xs = [i for i, s in enumerate(settings) if s in points]
        ax.plot(
            xs,
            [points[settings[i]] for i in xs],
            marker=markers[number % len(markers)],
            markersize=max(3.0, 9.0 - 1.5 * number),
            label=f"{arch} d={d_model}",
        )
    ax.set_xticks(range(len(settings)), labels)
    ax.set_xlabel("sequence length" + (" / kv pairs" if any(r.num_kv_pairs for r in runs) else ""))
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- command line


def parse_settings(text: str, task: str) -> list[tuple[int, int | None]]:
    """``"64:4,128:8"`` (mqar: seq_len:kv_pairs) or ``"64,128"`` (induction: seq_len)."""
    settings: list[tuple[int, int | None]] = []
    for item in text.split(","):
        seq_len, _, kv = item.strip().partition(":")
        if task == "mqar" and not kv:
            raise ValueError(f"--settings for mqar are SEQ_LEN:KV_PAIRS, got {item!r}")
        settings.append((int(seq_len), int(kv) if kv else None))
    return settings


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--config-kw expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string
    return overrides


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_subparser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``transformers-mhc synthetic``."""
    parser = subparsers.add_parser(
        "synthetic",
        help="train small models on MQAR / induction heads on CPU and report recall accuracy",
        description="Train one small model per (arch, d_model, setting) for a fixed number of steps on "
        "fresh synthetic batches and report held-out accuracy as JSON plus a PNG plot.",
    )
    parser.add_argument("--arch", required=True, help=f"comma-separated, from {', '.join(ARCHS)}")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument(
        "--settings",
        default=None,
        help="mqar: SEQ:KV,... (default: Zoology's 64:4,128:8,256:16,256:32,256:64); induction: SEQ,... "
        "(default: 64,128,256)",
    )
    parser.add_argument("--d-model", default="128", help="comma-separated widths (default: %(default)s)")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=1)
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=256,
        help="default %(default)s: learnable in a CPU budget (Zoology uses 8192, which needs far more steps)",
    )
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--config-kw",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config field (JSON value)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output-dir", default="synthetic_results")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """``transformers-mhc synthetic``: train, then write ``synthetic_{task}.json`` and ``.png``."""
    try:
        archs = [a.strip() for a in args.arch.split(",") if a.strip()]
        unknown = [a for a in archs if a not in ARCHS]
        if unknown or not archs:
            raise ValueError(f"--arch must be from {', '.join(ARCHS)}, got {args.arch!r}")
        default = "64:4,128:8,256:16,256:32,256:64" if args.task == "mqar" else "64,128,256"
        settings = parse_settings(args.settings or default, args.task)
        overrides = _parse_overrides(args.config_kw)
        train = TrainSettings(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            eval_examples=args.eval_examples,
            seed=args.seed,
        )
        if args.threads:
            torch.set_num_threads(args.threads)
        runs = run_synthetic(
            archs,
            args.task,
            settings,
            d_models=_int_list(args.d_model),
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            vocab_size=args.vocab_size,
            train=train,
            config_overrides=overrides,
            progress=True,
        )
    except (ValueError, ImportError) as err:
        print(f"transformers-mhc synthetic: error: {err}", file=sys.stderr)
        return 2
    report = {
        "task": args.task,
        "arguments": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "model": {"num_layers": args.num_layers, "num_heads": args.num_heads, "vocab_size": args.vocab_size},
        "train": asdict(train),
        "torch_threads": torch.get_num_threads(),
        "runs": [asdict(run) for run in runs],
    }
    out = Path(args.output_dir)
    title = f"{args.task.upper() if args.task == 'mqar' else 'Induction heads'}: {args.num_layers} layers, {args.steps} steps"
    write_atomic(out / f"synthetic_{args.task}.json", json.dumps(report, indent=2))
    write_atomic(out / f"synthetic_{args.task}.png", plot_runs(runs, title))
    for run in runs:
        setting = f"T={run.seq_len}" + (f" kv={run.num_kv_pairs}" if run.num_kv_pairs else "")
        print(f"{run.arch:>18} d={run.d_model:<4} {setting:<14} accuracy {run.accuracy:.3f}")
    print(f"wrote {out / f'synthetic_{args.task}.json'} and {out / f'synthetic_{args.task}.png'}")
    return 0
