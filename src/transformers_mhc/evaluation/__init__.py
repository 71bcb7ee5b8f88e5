"""Evaluation: the downstream suite on local data (through lm-eval) and synthetic recall tasks.

- :func:`evaluate_model` / ``transformers-mhc eval``: BBH, GSM8K, MMLU-Redux (and other lm-eval tasks
  given local files) with lm-eval's own prompts, filters and metrics.
- :func:`mqar_batch`, :func:`induction_batch`, :func:`run_synthetic` / ``transformers-mhc synthetic``.
"""

from transformers_mhc.evaluation.suite import evaluate_model, format_markdown
from transformers_mhc.evaluation.synthetic import induction_batch, mqar_batch, run_synthetic

__all__ = ["evaluate_model", "format_markdown", "induction_batch", "mqar_batch", "run_synthetic"]
