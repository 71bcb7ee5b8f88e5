"""Exact match as an `evaluate` metric module that loads from this folder, with no Hub access.

`evaluate.load("exact_match")` downloads its script from the Hub; `evaluate.load(<this folder>)` does
not. Options follow the Hub metric (and lm-eval's port of it): strings are compared after removing
every match of `regexes_to_ignore`, then optionally lower-casing and stripping punctuation/digits.
"""

import re
import string

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of predictions equal to their reference after optional normalisation."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): model outputs.
    references (list of str): expected outputs, one per prediction.
    regexes_to_ignore (list of str, optional): patterns removed (re.sub) from both sides, in order.
    ignore_case (bool): compare lower-cased strings. Default False.
    ignore_punctuation (bool): drop string.punctuation characters. Default False.
    ignore_numbers (bool): drop digits. Default False.
Returns:
    exact_match (float): in [0, 1].
"""


def _normalise(texts, regexes_to_ignore, ignore_case, ignore_punctuation, ignore_numbers):
    out = []
    for text in texts:
        for pattern in regexes_to_ignore or ():
            text = re.sub(pattern, "", text)
        if ignore_case:
            text = text.lower()
        if ignore_punctuation:
            text = text.translate(str.maketrans("", "", string.punctuation))
        if ignore_numbers:
            text = text.translate(str.maketrans("", "", string.digits))
        out.append(text)
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        regexes_to_ignore=None,
        ignore_case=False,
        ignore_punctuation=False,
        ignore_numbers=False,
    ):
        options = (regexes_to_ignore, ignore_case, ignore_punctuation, ignore_numbers)
        predictions = _normalise(predictions, *options)
        references = _normalise(references, *options)
        matches = [p == r for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": float(np.mean(matches)) if matches else 0.0}
