"""`evaluate` metrics that load from modules shipped in this package, never from the Hub.

`evaluate.load("exact_match")` fetches the metric script from the Hub and fails offline;
`evaluate.load(<local folder>)` works anywhere. The downstream suite's own metrics are lm-eval's
built-in ones (no `evaluate` needed); use these for anything else that wants an `evaluate` metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def available_metrics() -> list[str]:
    """Names of the metric modules shipped in ``metrics/`` (``metrics/<name>/<name>.py``)."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def load_offline_metric(name: str, **kwargs: Any):
    """``evaluate.load`` of the shipped metric module ``name`` (e.g. ``"exact_match"``)."""
    import evaluate

    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        raise ValueError(f"no local metric module {name!r}; available: {', '.join(available_metrics())}")
    return evaluate.load(str(folder), **kwargs)
