"""Autotuning of the decay kernels: the launch configurations each kernel may pick, and only those that compile
without register spills on sm_90.

A kernel's candidates are `triton.Config`s over its value tile ``BV``, ``num_warps`` and ``num_stages``. A
candidate is admitted for a shape only if the fp32 tiles a thread holds stay under a budget (the rule each
kernel states next to its candidates); ``benchmarks/ptxas_spills.py`` compiles every admitted candidate at
K = V in {64, 128, 256} and the slow test ``tests/test_kernels_ptxas.py`` checks that none spills. The autotuner
times the admitted candidates on the first call of each (K, V, decay granularity, dtype), the key below plus
the dtypes of the tensor arguments, which Triton appends to every key.

Under ``TRITON_INTERPRET=1`` (CPU tests) each kernel has a single candidate: the interpreter cannot time
anything, and one configuration keeps the tests fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import triton

from .runtime import INTERPRETED

# The autotuner's key of every decay kernel: head dims and decay granularity (GK = K for vector decay, 1 for
# scalar decay); Triton adds the dtypes of the tensor arguments.
AUTOTUNE_KEY = ["K", "V", "GK"]


def candidates(
    block_vs: Iterable[int], warps: Iterable[int], stages: Iterable[int], interpreted: tuple[int, int, int]
) -> list[triton.Config]:
    """Every (BV, num_warps, num_stages) combination, or under the interpreter the single one given."""
    if INTERPRETED:
        block_vs, warps, stages = ([x] for x in interpreted)
    return [
        triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv in block_vs for w in warps for s in stages
    ]


def pruner(fits: Callable[[triton.Config, int, torch.dtype], bool]) -> Callable:
    """An ``early_config_prune`` for ``triton.autotune``: ``admitted_configs`` for the launch's ``K``, ``V`` and
    input dtype (that of its first tensor argument, ``q`` or ``k``)."""

    def prune(configs, named_args, **kwargs):
        dtype = next(arg.dtype for arg in named_args.values() if isinstance(arg, torch.Tensor))
        return admitted_configs(configs, fits, kwargs["K"], kwargs["V"], dtype)

    return prune


def admitted_configs(
    configs: list[triton.Config],
    fits: Callable[[triton.Config, int, torch.dtype], bool],
    K: int,
    V: int,
    dtype: torch.dtype | None,
) -> list[triton.Config]:
    """The configs that ``fits(config, BK, dtype)`` allows for key dim ``K`` (``BK`` its padded tile), dropping
    value tiles wider than ``V`` needs; the smallest config if none fits."""
    BK = triton.next_power_of_2(K)
    BV_max = max(16, triton.next_power_of_2(V))
    kept = [c for c in configs if c.kwargs["BV"] <= BV_max and fits(c, BK, dtype)]
    return kept or [min(configs, key=lambda c: (c.kwargs["BV"], -c.num_warps, c.num_stages))]
