"""Small public-domain texts shipped with the package, for examples and self-checks that must run offline.

- `"alice"`: the opening of Lewis Carroll's *Alice's Adventures in Wonderland* (1865, public domain),
  about 1,500 characters: enough for a quick fine-tuning demo and a fixed batch to compare logits on.
"""

from __future__ import annotations

from importlib import resources

BUILTIN_TEXTS: dict[str, str] = {"alice": "alice.txt"}


def load_text(name: str = "alice") -> str:
    """Returns the built-in text `name` (one of `BUILTIN_TEXTS`)."""
    if name not in BUILTIN_TEXTS:
        raise ValueError(f"Unknown built-in text {name!r}; available: {sorted(BUILTIN_TEXTS)}.")
    return resources.files(__name__).joinpath(BUILTIN_TEXTS[name]).read_text(encoding="utf-8")


__all__ = ["BUILTIN_TEXTS", "load_text"]
