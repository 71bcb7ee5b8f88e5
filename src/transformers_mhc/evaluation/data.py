"""Local data for the downstream suite: where it lives, and the MMLU-Redux CSV reader.

The data folder (holding ``bbh/``, ``gsm8k/``, ``mmlu_redux/``) is, first match wins: the one given
(``--data-dir``), the ``TRANSFORMERS_MHC_DATA`` environment variable, then ``../shared/data`` next to
the current directory or next to the repository checkout. :mod:`.local_tasks` writes lm-eval tasks
that read it.
"""

from __future__ import annotations

import ast
import csv
import io
import os
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)  # transformers' logging: the CLI's -v / -q apply

DATA_DIR_ENV = "TRANSFORMERS_MHC_DATA"

# src/transformers_mhc/evaluation/data.py -> the repository root is three levels above the package.
_REPO_ROOT = Path(__file__).resolve().parents[3]

MMLU_REDUX_COLUMNS = ("question", "choices", "answer", "error_type")


class DataDirError(FileNotFoundError):
    """The evaluation data folder (or a file inside it) is missing."""


def default_data_dir() -> Path | None:
    """The data folder used when none is given: ``$TRANSFORMERS_MHC_DATA`` or ``../shared/data``.

    ``../shared/data`` is looked up relative to the current directory first, then relative to the
    repository checkout this package is installed from (editable installs). Returns ``None`` when no
    candidate exists.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    for base in (Path.cwd(), _REPO_ROOT):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the data folder to read, raising :class:`DataDirError` with the fix when there is none."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataDirError(f"--data-dir {path} is not a folder")
        return path.resolve()
    path = default_data_dir()
    if path is None or not path.is_dir():
        looked = (
            os.environ.get(DATA_DIR_ENV)
            or f"{Path.cwd().parent / 'shared' / 'data'}, {_REPO_ROOT.parent / 'shared' / 'data'}"
        )
        raise DataDirError(
            f"no evaluation data folder found (looked in {looked}); pass --data-dir DIR "
            f"(the folder holding bbh/, gsm8k/, mmlu_redux/) or set {DATA_DIR_ENV}"
        )
    return path.resolve()


def normalize_error_type(value: str | None) -> str:
    """MMLU-Redux annotations spell labels inconsistently (``OK``, ``ok ``, ``wrong_groundtruth``)."""
    return " ".join((value or "").replace("_", " ").lower().split())


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # One Redux file has a stray single-byte (non UTF-8) apostrophe; replace rather than guess the
        # code page so that the questions stay readable and nothing else changes.
        text = raw.decode("utf-8", errors="replace")
        logger.warning("%s is not valid UTF-8: %d byte(s) replaced", path, text.count("\ufffd"))
        return text


def _sniff_delimiter(header: str, path: Path) -> str:
    # Redux files use ',' or ';' (exported by different annotators); the header decides.
    for delimiter in (",", ";", "\t"):
        columns = {c.strip() for c in next(csv.reader([header], delimiter=delimiter))}
        if set(MMLU_REDUX_COLUMNS) <= columns:
            return delimiter
    raise ValueError(f"{path}: header {header!r} lacks the MMLU-Redux columns {MMLU_REDUX_COLUMNS}")


def read_mmlu_redux_csv(path: str | os.PathLike[str], subject: str | None = None) -> list[dict[str, Any]]:
    """Read one MMLU-Redux ``mmlu_{subject}.csv`` into MMLU documents.

    Each row becomes ``{"question", "subject", "choices": [4 str], "answer": int 0-3,
    "error_type": normalised label, "correct_answer": str}``: the columns of the Hub's ``cais/mmlu``
    (which lm-eval's MMLU prompts read) plus the Redux annotation.
    """
    path = Path(path)
    subject = subject or path.stem.removeprefix("mmlu_")
    text = _decode(path.read_bytes(), path)
    delimiter = _sniff_delimiter(text.splitlines()[0], path)
    docs = []
    for line, row in enumerate(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter), start=2):
        row = {(k or "").strip(): v for k, v in row.items()}
        choices = ast.literal_eval(row["choices"])
        if not (isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)):
            raise ValueError(
                f"{path} row {line}: 'choices' must be a list of 4 strings, got {row['choices']!r}"
            )
        answer = int(row["answer"])
        if answer not in range(4):
            raise ValueError(f"{path} row {line}: 'answer' must be 0-3, got {row['answer']!r}")
        docs.append(
            {
                "question": row["question"],
                "subject": subject,
                "choices": choices,
                "answer": answer,
                "error_type": normalize_error_type(row["error_type"]),
                "correct_answer": (row.get("correct_answer") or "").strip(),
            }
        )
    return docs
