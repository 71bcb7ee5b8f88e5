"""Local data for the downstream suite: where it lives and how lm-eval tasks read it.

lm-eval's built-in tasks download their data from the Hub. Our task definitions (``tasks/``) keep the
built-in prompts, filters and metrics and swap only the loader for one of the functions below, used
as the task's ``custom_dataset``. lm-eval calls it with the task's ``metadata`` and
``dataset_kwargs`` merged into keyword arguments, so every loader accepts and ignores extra keys.

The data folder is resolved, first match wins, from: the ``local_data_dir`` dataset kwarg (set by
:func:`transformers_mhc.evaluation.evaluate_model`), the ``data_dir`` metadata key (``lm_eval
--metadata '{"data_dir": ...}'``), the ``TRANSFORMERS_MHC_DATA`` environment variable, then
``../shared/data`` next to the current directory or next to the repository checkout.
"""

from __future__ import annotations

import ast
import csv
import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "TRANSFORMERS_MHC_DATA"

# src/transformers_mhc/evaluation/data.py -> the repository root is three levels above the package.
_REPO_ROOT = Path(__file__).resolve().parents[3]

# File suffix -> `datasets` packaged builder.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}

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


def _data_path(relative: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None) -> Path:
    path = Path(relative).expanduser()
    if not path.is_absolute():
        path = resolve_data_dir(data_dir) / path
    if not path.is_file():
        raise DataDirError(f"data file not found: {path}")
    return path


def load_local_files(
    *,
    local_files: Mapping[str, str],
    json_field: str | None = None,
    local_data_dir: str | None = None,
    data_dir: str | None = None,
    **_ignored: Any,
):
    """``custom_dataset`` for tasks whose local files already have the Hub data set's columns.

    Args:
        local_files: split name -> file, absolute or relative to the data folder; the format comes
            from the suffix (``.json``/``.jsonl``, ``.csv``, ``.parquet``, ``.arrow``).
        json_field: for JSON files holding ``{field: [records]}`` (BBH keeps them under ``examples``).
        local_data_dir, data_dir: the data folder (see the module docstring for the order).

    Returns:
        a ``datasets.DatasetDict`` with one split per entry of ``local_files``.
    """
    import datasets

    folder = local_data_dir or data_dir
    splits = {}
    for split, relative in local_files.items():
        path = _data_path(relative, folder)
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{path}: unsupported suffix {path.suffix!r}; use one of {sorted(_BUILDERS)}")
        kwargs = {"field": json_field} if builder == "json" and json_field else {}
        # One `load_dataset` per split so that every split may come in its own format.
        splits[split] = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
    return datasets.DatasetDict(splits)


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


def load_mmlu_redux(
    *,
    mmlu_redux_subject: str,
    mmlu_redux_skip_flagged: bool | None = None,
    skip_flagged_mmlu: bool = False,
    local_data_dir: str | None = None,
    data_dir: str | None = None,
    **_ignored: Any,
):
    """``custom_dataset`` for the MMLU subjects: ``mmlu_redux/mmlu_{subject}.csv`` as a ``test`` split.

    Args:
        mmlu_redux_subject: MMLU subject, e.g. ``"anatomy"``.
        mmlu_redux_skip_flagged / skip_flagged_mmlu: drop the questions whose Redux ``error_type`` is
            not ``ok`` (a disputed ground truth). The first is set per run by ``evaluate_model``; the
            second is the ``--metadata`` spelling for direct ``lm_eval`` use.
        local_data_dir, data_dir: the data folder (see the module docstring for the order).
    """
    import datasets

    path = _data_path(Path("mmlu_redux") / f"mmlu_{mmlu_redux_subject}.csv", local_data_dir or data_dir)
    docs = read_mmlu_redux_csv(path, mmlu_redux_subject)
    skip = skip_flagged_mmlu if mmlu_redux_skip_flagged is None else mmlu_redux_skip_flagged
    if skip:
        docs = [doc for doc in docs if doc["error_type"] == "ok"]
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "subject": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.Value("int64"),
            "error_type": datasets.Value("string"),
            "correct_answer": datasets.Value("string"),
        }
    )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs, features=features)})
