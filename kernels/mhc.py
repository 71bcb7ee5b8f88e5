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
"""Triton kernels of Manifold-Constrained Hyper-Connections (mHC paper §5), registered as torch custom ops.

`transformers_mhc.models.mhc_ops` holds the pure-PyTorch references with the same signatures and dispatches to
these as `kernel_backend` says (see `use_triton_kernels` there):

- `sinkhorn_knopp_triton(logits, num_iterations)`: log-space Sinkhorn-Knopp, exact recomputing backward
  (`mhc_sinkhorn.py`)
- `mhc_coefficients_triton(x, phi, alpha, static_bias, eps)`: fused projection + sum of squares + gates +
  sigmoids (`mhc_coefficients.py`)
- `hc_pre_mix_triton(h_pre, x)`: `Σ_j h_pre_j x_j` (`mhc_mix.py`)
- `hc_res_post_mix_triton(h_res, x, h_post, f)`: `h_res · x + h_postᵀ · f` in one pass (`mhc_mix.py`)

Each launches through a forward and a backward op (`torch.ops.transformers_mhc.<name>_fwd` / `_bwd`, with
`register_fake` and `register_autograd`), so `torch.compile` traces each launch as one op and selective
checkpointing can save or recompute its outputs. Without a GPU they run on CPU tensors only under
`TRITON_INTERPRET=1` (set before this module is imported).
"""

from __future__ import annotations

import torch

from . import mhc_coefficients, mhc_mix, mhc_sinkhorn
from .mhc_coefficients import mhc_coefficients_triton
from .mhc_mix import hc_pre_mix_triton, hc_res_post_mix_triton
from .mhc_sinkhorn import sinkhorn_knopp_triton
from .runtime import can_launch_on


def compile_jobs(n: int, dtype: torch.dtype) -> list[tuple]:
    """`(kernel, constexprs, launch options)` of every mHC kernel variant the launchers compile for `n` streams of
    `dtype` (many tokens, hidden size 4096), for offline compiles without a GPU (`benchmarks/ptxas_spills.py`).
    Pointers named in `STREAM_POINTERS` carry `dtype`; every other one is fp32."""
    return [
        job for module in (mhc_sinkhorn, mhc_coefficients, mhc_mix) for job in module.compile_jobs(n, dtype)
    ]


# The kernels' pointer arguments that carry the model dtype (streams, sub-layer output and their gradients).
STREAM_POINTERS = frozenset({"x_ptr", "f_ptr", "out_ptr", "grad_out_ptr", "grad_x_ptr", "grad_f_ptr"})

__all__ = [
    "STREAM_POINTERS",
    "can_launch_on",
    "compile_jobs",
    "hc_pre_mix_triton",
    "hc_res_post_mix_triton",
    "mhc_coefficients_triton",
    "sinkhorn_knopp_triton",
]
