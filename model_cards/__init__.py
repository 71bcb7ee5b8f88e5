"""Model card templates of transformers-mhc (Jinja2, rendered by `huggingface_hub.ModelCard.from_template`).

Each template starts with the YAML metadata block (`{{ card_data }}`, filled from a `ModelCardData`) and
renders the Markdown body from the variables prepared by `transformers_mhc.hub.build_model_card`:

- `mhc.md`: models with (manifold-constrained) hyper-connections (`model_type="mhc"`);
- `decay_linear_attn.md`: decay linear-attention models (`model_type="decay_linear_attn"`);
- `converted.md`: pretrained Llama-style checkpoints retrofitted with hyper-connections, with the
  conversion exactness measured at conversion time.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

TEMPLATES: dict[str, str] = {
    "mhc": "mhc.md",
    "decay_linear_attn": "decay_linear_attn.md",
    "converted": "converted.md",
}


def template_path(kind: str) -> Path:
    """Returns the path of the card template `kind` (one of `TEMPLATES`)."""
    if kind not in TEMPLATES:
        raise ValueError(f"Unknown model card template {kind!r}; available: {sorted(TEMPLATES)}.")
    path = Path(str(resources.files(__name__).joinpath(TEMPLATES[kind])))
    if not path.is_file():
        raise FileNotFoundError(f"Model card template {path} is missing from the installed package.")
    return path


__all__ = ["TEMPLATES", "template_path"]
