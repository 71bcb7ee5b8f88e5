# Copyright 2026 The transformers-mhc contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""What an lm-eval run will cost, said before it starts, and lm-eval's per-request notices said once.

:func:`planned_hflm` returns a subclass of lm-eval's ``HFLM`` that, when lm-eval hands it the first
batch of requests (all tasks' requests are built by then), prints how many requests of each kind the run
holds and an estimated time, from the tokens/s of a short warm-up of the model on this machine. lm-eval's
own tqdm bars then show the progress. :func:`notices_once` lets the first "Left truncation" (generation)
and "Combined length ... exceeds" (loglikelihood) notice of ``HFLM`` through and counts the repeats.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Logger of lm-eval's HFLM and the notices it repeats for every request.
HFLM_LOGGER = "lm_eval.models.huggingface"
REPEATED_NOTICES = {
    "Left truncation applied": "left truncation of the prompt (generation)",
    "Combined length of context": "left truncation of context + continuation (loglikelihood)",
}

WARMUP_SHORT = 8  # tokens; the short forward that measures the per-call overhead
WARMUP_MAX_LENGTH = 512  # longer prompts are extrapolated linearly rather than run in the warm-up
WARMUP_DECODE_STEPS = 8


@dataclass
class Throughput:
    """Warm-up timings at one batch size, as functions of the (padded) sequence length ``L``: a forward
    of the batch takes ``a + b L + c L^2`` seconds (attention makes long prompts cost more than their
    share), one decoding step of the batch with ``L`` tokens of context ``d0 + d1 L``."""

    batch_size: int
    forward: tuple[float, float, float]
    decode: tuple[float, float] | None = None

    def forward_s(self, length: int) -> float:
        a, b, c = self.forward
        return a + b * length + c * length * length

    def decode_s(self, context: int) -> float:
        if self.decode is None:
            return 0.0
        d0, d1 = self.decode
        return d0 + d1 * context


@dataclass
class RunPlan:
    """The requests of a run and its estimated duration (seconds)."""

    requests: dict[str, int]
    forward_passes: int  # loglikelihood calls after lm-eval's sharing of one-token continuations
    prompt_tokens: int
    max_new_tokens: int  # if every generation ran to its max_gen_toks
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    estimated_s: float | None = None  # with each generation stopping after one token
    estimated_max_s: float | None = None  # with each generation running to max_gen_toks
    warmup_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        kinds = ", ".join(f"{count:,} {kind}" for kind, count in self.requests.items())
        lines = [
            f"lm-eval: {sum(self.requests.values()):,} requests ({kinds}), {self.prompt_tokens:,} prompt tokens"
        ]
        if self.prefill_tokens_per_s:
            speed = f"warm-up ({self.warmup_s:.1f} s): {self.prefill_tokens_per_s:,.0f} prompt tokens/s"
            if self.decode_tokens_per_s:
                speed += f", {self.decode_tokens_per_s:,.0f} generated tokens/s"
            lines.append(speed)
        if self.estimated_s is not None:
            if self.max_new_tokens and self.estimated_max_s is not None:
                lines.append(
                    f"estimated time: {format_seconds(self.estimated_s)} to {format_seconds(self.estimated_max_s)} "
                    f"(generations stop at their stop sequences; the upper figure is every one of them writing "
                    f"max_gen_toks, {self.max_new_tokens:,} tokens in all)"
                )
            else:
                lines.append(f"estimated time: {format_seconds(self.estimated_s)}")
        return "\n".join(lines)


def format_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _forward_lengths(lm: Any, requests: Sequence[Any]) -> list[int]:
    """Token lengths of the forwards lm-eval's HFLM runs for loglikelihood requests: it runs one forward
    per distinct context + continuation-but-its-last-token (the logits of one forward score every
    continuation that differs only in its last token, e.g. the choices " A", " B" of MMLU)."""
    contexts = _token_ids(lm, [req.args[0] for req in requests])
    continuations = _token_ids(lm, [req.args[1] for req in requests])
    seen: set[int] = set()
    lengths = []
    for context, continuation in zip(contexts, continuations):
        key = hash(tuple(context + continuation[:-1]))  # a hash: full MMLU holds millions of tokens
        if key in seen:
            continue
        seen.add(key)
        lengths.append(min(len(context) + len(continuation), lm.max_length + 1) - 1)
    return lengths


def _token_ids(lm: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [ids or [0] for ids in lm.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _token_lengths(lm: Any, texts: Sequence[str]) -> list[int]:
    return [len(ids) for ids in _token_ids(lm, texts)]


def _batches(lengths: Iterable[int], batch_size: int) -> list[int]:
    """Padded length of each batch, as lm-eval runs them (longest first)."""
    ordered = sorted(lengths, reverse=True)
    return [ordered[i] for i in range(0, len(ordered), batch_size)]


def _fit_forward(points: Sequence[tuple[int, float]]) -> tuple[float, float, float]:
    """``a + b L + c L^2`` through three (L, seconds) points, with no negative term (noise on a busy
    machine can bend the curve the wrong way: then the line through the outer points)."""
    import numpy as np

    lengths, seconds = zip(*points)
    c, b, a = np.polyfit(lengths, seconds, 2)
    if a < 0 or b < 0 or c < 0:
        (l0, t0), (l1, t1) = points[0], points[-1]
        b = max((t1 - t0) / (l1 - l0), 1e-9)
        a, c = max(t0 - b * l0, 0.0), 0.0
    return float(a), float(b), float(c)


def measure_throughput(model: Any, *, batch_size: int, length: int, device: Any, decode: bool) -> Throughput:
    """Time forwards of ``batch_size`` sequences of a few tokens, ``length / 2`` and ``length`` tokens
    (capped at :data:`WARMUP_MAX_LENGTH`), and, if ``decode``, a few greedy decoding steps after the
    shortest and the longest."""
    import torch

    vocab = int(getattr(model.config, "vocab_size", 0) or 2)
    generator = torch.Generator().manual_seed(0)
    long = max(min(length, WARMUP_MAX_LENGTH), 4 * WARMUP_SHORT)
    lengths = (WARMUP_SHORT, long // 2, long)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(1, max(vocab, 2), (batch_size, n), generator=generator).to(device)

    def timed(fn, repeats: int = 1) -> float:
        # The median of a few runs: on a shared machine the run will see the same contention as the
        # warm-up, so neither the luckiest nor the unluckiest call is the best predictor.
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    def generate(prompt: torch.Tensor, steps: int) -> None:
        model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
        )

    with torch.inference_mode():
        inputs = {n: ids(n) for n in lengths}
        for n in lengths:  # the first call at a shape allocates and selects kernels: not timed
            model(input_ids=inputs[n])
        points = [(n, timed(lambda n=n: model(input_ids=inputs[n]), repeats=3)) for n in lengths]
        forward = _fit_forward(points)
        decode_fit = None
        if decode:
            generate(inputs[WARMUP_SHORT], 2)
            steps = []
            for n in (WARMUP_SHORT, long):
                elapsed = timed(lambda n=n: generate(inputs[n], WARMUP_DECODE_STEPS))
                steps.append(max(elapsed - dict(points)[n], 1e-9) / WARMUP_DECODE_STEPS)
            slope = max((steps[1] - steps[0]) / (long - WARMUP_SHORT), 0.0)
            decode_fit = (max(steps[0] - slope * WARMUP_SHORT, 1e-9), slope)
    return Throughput(batch_size, forward, decode_fit)


def plan_run(lm: Any, requests: Sequence[Any], *, warmup: bool = True) -> RunPlan:
    """Count ``requests`` (lm-eval ``Instance``\\ s) and estimate their time on ``lm`` (an ``HFLM``)."""
    by_kind: dict[str, list[Any]] = {}
    for req in requests:
        by_kind.setdefault(req.request_type, []).append(req)
    batch_size = lm.batch_size if isinstance(lm.batch_size, int) else 1
    loglikelihood = by_kind.get("loglikelihood", [])
    rolling = by_kind.get("loglikelihood_rolling", [])
    generation = by_kind.get("generate_until", [])

    forward_lengths = _forward_lengths(lm, loglikelihood)
    # Rolling loglikelihood (perplexity) scores whole documents in windows of max_length tokens.
    for length in _token_lengths(lm, [req.args[0] for req in rolling]):
        windows = math.ceil(length / lm.max_length)
        forward_lengths += [lm.max_length] * (windows - 1) + [length - (windows - 1) * lm.max_length]
    gen_budgets = [int(req.args[1].get("max_gen_toks", lm.max_gen_toks)) for req in generation]
    gen_prompts = [
        min(length, lm.max_length - budget)
        for length, budget in zip(_token_lengths(lm, [req.args[0] for req in generation]), gen_budgets)
    ]
    order = ["loglikelihood", "loglikelihood_rolling", "generate_until"]
    order += sorted(set(by_kind) - set(order))
    plan = RunPlan(
        requests={kind: len(by_kind[kind]) for kind in order if kind in by_kind},
        forward_passes=len(forward_lengths),
        prompt_tokens=sum(forward_lengths) + sum(gen_prompts),
        max_new_tokens=sum(gen_budgets),
    )
    if not warmup or not (forward_lengths or gen_prompts):
        return plan

    start = time.perf_counter()
    lengths = sorted(forward_lengths + gen_prompts)
    speed = measure_throughput(
        lm.model,
        batch_size=batch_size,
        length=lengths[int(0.95 * (len(lengths) - 1))],
        device=lm.device,
        decode=bool(generation),
    )
    plan.warmup_s = time.perf_counter() - start
    typical = int(statistics.median(lengths))
    plan.prefill_tokens_per_s = batch_size * typical / speed.forward_s(typical)
    if generation:
        plan.decode_tokens_per_s = batch_size / speed.decode_s(typical)
    prompts_s = sum(speed.forward_s(n) for n in _batches(forward_lengths, batch_size))
    generation_s = max_generation_s = 0.0
    # lm-eval batches generation requests with equal settings; each batch decodes until all its
    # requests stop (upper bound: max_gen_toks steps).
    for budget, padded in _generation_batches(gen_budgets, gen_prompts, batch_size):
        prefill = speed.forward_s(padded)
        generation_s += prefill + speed.decode_s(padded)
        # budget steps at contexts padded, padded + 1, ...: their mean context is padded + (budget - 1) / 2
        max_generation_s += prefill + budget * speed.decode_s(padded + (budget - 1) // 2)
    plan.estimated_s = prompts_s + generation_s
    plan.estimated_max_s = prompts_s + max_generation_s
    return plan


def _generation_batches(
    budgets: Sequence[int], prompts: Sequence[int], batch_size: int
) -> Iterator[tuple[int, int]]:
    by_budget: dict[int, list[int]] = {}
    for budget, prompt in zip(budgets, prompts):
        by_budget.setdefault(budget, []).append(prompt)
    for budget, lengths in by_budget.items():
        for padded in _batches(lengths, batch_size):
            yield budget, padded


@functools.lru_cache(maxsize=1)
def planned_hflm() -> type:
    """lm-eval's ``HFLM``, announcing the run's :class:`RunPlan` before its first request.

    Call ``lm.plan_for(tasks)`` with the run's lm-eval ``Task`` objects before ``simple_evaluate``;
    the plan is built when lm-eval first calls the model, once every task's requests exist.
    """
    from lm_eval.models.huggingface import HFLM

    class PlannedHFLM(HFLM):
        def plan_for(self, tasks: Iterable[Any], *, verbose: bool = True, warmup: bool = True) -> None:
            self.mhc_tasks = list(tasks)
            self.mhc_verbose = verbose
            self.mhc_warmup = warmup
            self.mhc_plan: RunPlan | None = None
            self.mhc_started: float | None = None

        def mhc_announce(self) -> None:
            if getattr(self, "mhc_tasks", None) is None or self.mhc_plan is not None:
                return
            requests = [req for task in self.mhc_tasks for req in task.instances]
            self.mhc_plan = plan_run(self, requests, warmup=self.mhc_warmup)
            if self.mhc_verbose:
                print(self.mhc_plan.describe(), file=sys.stderr, flush=True)
            self.mhc_started = time.perf_counter()

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self.mhc_announce()
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self.mhc_announce()
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            self.mhc_announce()
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    return PlannedHFLM


class _FirstOnly(logging.Filter):
    """Passes the first record starting with each prefix; counts the others."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        prefix = next((p for p in self.prefixes if message.startswith(p)), None)
        if prefix is None:
            return True
        self.counts[prefix] += 1
        if self.counts[prefix] > 1:
            return False
        record.msg, record.args = f"{message} (said once per run; repeats are counted)", None
        return True


@contextlib.contextmanager
def notices_once(logger_name: str = HFLM_LOGGER) -> Iterator[Counter[str]]:
    """Show each of lm-eval's per-request notices (:data:`REPEATED_NOTICES`) once in the block, then how
    many requests it applied to. Yields the counts (notice prefix -> requests)."""
    target = logging.getLogger(logger_name)
    only_first = _FirstOnly(REPEATED_NOTICES)
    target.addFilter(only_first)
    try:
        yield only_first.counts
    finally:
        target.removeFilter(only_first)
        for prefix, count in only_first.counts.items():
            if count > 1:
                logger.warning("%s: %d requests in all", REPEATED_NOTICES[prefix], count)
