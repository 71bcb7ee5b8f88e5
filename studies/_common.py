"""Helpers shared by the study scripts: the Shakespeare corpus at byte level, batching, seeding, JSON output.

The corpus is read from `<data-dir>/shakespeare/complete_works.txt`; `--data-dir` defaults to `../shared/data`
relative to the repository root. Tokens are raw bytes (vocabulary 256), so nothing is downloaded. The last 10% of
the file is held out for validation, as the corpus README recommends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
CORPUS_RELPATH = Path("shakespeare") / "complete_works.txt"
VOCAB_SIZE = 256  # byte-level tokens
VALIDATION_FRACTION = 0.1


@dataclass
class Corpus:
    """Byte tokens of the corpus, split into a training and a validation part."""

    train: torch.Tensor  # uint8 [N_train]
    val: torch.Tensor  # uint8 [N_val]
    path: Path


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """Adds `--data-dir` (default `../shared/data` next to the repository)."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"folder holding {CORPUS_RELPATH} (default: {DEFAULT_DATA_DIR})",
    )


def load_corpus(data_dir: Path, max_bytes: int | None = None) -> Corpus:
    """Reads the Shakespeare corpus as bytes; exits with a clear message if it is missing.

    Args:
        data_dir: folder containing `shakespeare/complete_works.txt`.
        max_bytes: if given, only the first `max_bytes` bytes of the file are used (quick runs); the 90/10 split
            is applied to that prefix.
    """
    path = Path(data_dir) / CORPUS_RELPATH
    if not path.is_file():
        sys.exit(
            f"error: Shakespeare corpus not found at {path}. Pass --data-dir pointing to the folder that contains "
            f"'{CORPUS_RELPATH}' (the shared data folder, by default ../shared/data next to the repository)."
        )
    raw = path.read_bytes()
    if max_bytes is not None:
        raw = raw[:max_bytes]
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    split = int(len(data) * (1 - VALIDATION_FRACTION))
    return Corpus(train=data[:split], val=data[split:], path=path)


def sample_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """Random windows of `seq_len + 1` bytes (inputs are `[:, :-1]`, labels are the whole window).

    Returns `[batch_size, seq_len]` int64 token ids; the model's causal-LM loss shifts the labels itself.
    """
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()]).long()


def fixed_batches(
    data: torch.Tensor, num_batches: int, batch_size: int, seq_len: int, seed: int
) -> list[torch.Tensor]:
    """`num_batches` batches drawn with their own seed: the same held-out batches for every model."""
    generator = torch.Generator().manual_seed(seed)
    return [sample_batch(data, batch_size, seq_len, generator) for _ in range(num_batches)]


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean causal-LM loss (nats per byte) of `model` over `batches`."""
    was_training = model.training
    model.eval()
    losses = [float(model(input_ids=b, labels=b, use_cache=False).loss) for b in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of all parameter gradients (before any clipping)."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def environment() -> dict:
    """Versions and thread count, recorded in every results file."""
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def write_json_atomic(path: Path, payload: dict) -> None:
    """Writes JSON through a temporary file in the same folder, then renames it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    os.replace(tmp, path)


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Lays out a matplotlib figure, writes it to `path` (creating the folder) and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
