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
"""The hyper-connection arithmetic of the mHC paper (§3, §5) as plain PyTorch formulas, and the one dispatch point.

Shapes: `N` is any number of leading token dimensions, `n` the number of streams, `C` the hidden size.

- `mhc_coefficients(x, phi, alpha, static_bias, eps)`: `(h_pre, h_post, h_res logits)` from the streams
- `sinkhorn_knopp(logits, num_iterations)`: doubly stochastic `h_res`, exact row sums, recomputing backward
- `hc_pre_mix(h_pre, x)`: the sub-layer input `Σ_j h_pre_j x_j`
- `hc_res_post_mix(h_res, x, h_post, f)`: the new streams `h_res · x + h_postᵀ · f`

These are the references: autograd differentiates them, except Sinkhorn-Knopp, whose backward recomputes the
iterations (the paper's §5.2) so that saved memory does not grow with their number. Faster variants with the same
signatures live elsewhere — the fused, hand-differentiated torch Functions in `mhc_fused.py` and the Triton kernels
in `transformers_mhc.kernels.mhc` — and tests compare each with these formulas. `hyper_connection.mhc_implementation`
is the one place that picks a variant, by `use_triton_kernels` below (which `decay_ops` uses too).
"""

from __future__ import annotations

import torch
from transformers.utils import logging

from .configuration_mhc import KERNEL_BACKENDS

logger = logging.get_logger(__name__)

# What every kernel loads (fp64 stays on the torch path, which keeps it: gradcheck runs there).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The most streams the mHC kernels are compiled and tested for (their tiles grow with n² + 2n).
MAX_TRITON_STREAMS = 16


# --------------------------------------------------------------------------------------------------
# Coefficients (paper §3, §5.1)
# --------------------------------------------------------------------------------------------------
def mhc_coefficients(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, static_bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mHC coefficients from the flattened streams, in fp32.

    Args:
        x: `[N, n*C]` flattened streams.
        phi: `[n*n + 2n, n*C]` fused projection, rows ordered (pre, post, res).
        alpha: `[3]` gates (pre, post, res).
        static_bias: `[n*n + 2n]` static logits, same order.
        eps: RMSNorm epsilon.

    Returns:
        `h_pre = sigmoid(·)` `[N, n]`, `h_post = 2·sigmoid(·)` `[N, n]` and the `h_res` logits `[N, n, n]` (fed to
        `sinkhorn_knopp`). The RMSNorm's division is applied after the projection (§5.1): `(x φ) / rms(x)`.
    """
    n = num_streams_of(phi)
    x = x.float()
    inv_rms = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    pre, post, res = ((x @ phi.float().t()) * inv_rms).split([n, n, n * n], dim=-1)
    pre_bias, post_bias, res_bias = static_bias.float().split([n, n, n * n])
    alpha = alpha.float()
    h_pre = torch.sigmoid(alpha[0] * pre + pre_bias)
    h_post = 2 * torch.sigmoid(alpha[1] * post + post_bias)
    res_logits = (alpha[2] * res + res_bias).unflatten(-1, (n, n))
    return h_pre, h_post, res_logits


def num_streams_of(phi: torch.Tensor) -> int:
    """`n` from a fused projection of `n*n + 2n` rows."""
    width = phi.shape[0]
    n = round((width + 1) ** 0.5) - 1
    if n * n + 2 * n != width:
        raise ValueError(f"a fused hyper-connection projection has n*n + 2n rows, got {width}")
    return n


# --------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (paper §4.2, §5.2)
# --------------------------------------------------------------------------------------------------
def sinkhorn_log_iterates(
    logits: torch.Tensor, num_iterations: int, keep: bool, dims: tuple[int, int] = (-2, -1)
) -> list[torch.Tensor]:
    """Log-space Sinkhorn-Knopp. Returns the final log-matrix, or every iterate when `keep` (for backward).

    Working in log space (each normalisation is a `log_softmax`: subtracting a logsumexp) keeps every step finite
    even for logits of ±1e4, where `exp` would under- or overflow. Each iteration normalises the columns (`dims[0]`,
    the index `i` of `m_ij`), then the rows (`dims[1]`; last, so the row sums of the result are exact).
    """
    z = logits
    iterates = [z] if keep else []
    for _ in range(num_iterations):
        for dim in dims:
            z = torch.log_softmax(z, dim=dim)
            if keep:
                iterates.append(z)
    return iterates if keep else [z]


def sinkhorn_knopp_backward(
    logits: torch.Tensor, grad_out: torch.Tensor, num_iterations: int
) -> torch.Tensor:
    """Exact gradient of `sinkhorn_knopp` w.r.t. its (fp32) logits, recomputing the iterations.

    For a normalisation `y = x - logsumexp_d(x)`, `dL/dx = g - exp(y) · Σ_d g`.
    """
    iterates = sinkhorn_log_iterates(logits, num_iterations, keep=True)
    grad = grad_out * iterates[-1].exp()  # through the final exp
    # iterates[1:] alternate column (odd index) and row (even index) normalisations.
    for step in range(len(iterates) - 1, 0, -1):
        dim = -2 if step % 2 == 1 else -1
        grad = grad - iterates[step].exp() * grad.sum(dim=dim, keepdim=True)
    return grad


class SinkhornKnoppFunction(torch.autograd.Function):
    """Sinkhorn-Knopp in fp32 (float64 kept, for gradcheck) that saves only its logits and recomputes in backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, num_iterations: int) -> torch.Tensor:
        logits = logits if logits.dtype == torch.float64 else logits.float()
        ctx.save_for_backward(logits)
        ctx.num_iterations = num_iterations
        return sinkhorn_log_iterates(logits, num_iterations, keep=False)[0].exp()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return sinkhorn_knopp_backward(logits, grad_out.to(logits.dtype), ctx.num_iterations), None


def sinkhorn_knopp(logits: torch.Tensor, num_iterations: int = 20) -> torch.Tensor:
    """Projects `exp(logits)` (`[..., n, n]`) towards the doubly stochastic matrices (the Birkhoff polytope).

    Rows sum to 1 exactly, columns converge with the iterations. Computed in fp32 whatever the input dtype.
    """
    return SinkhornKnoppFunction.apply(logits, num_iterations)


def sinkhorn_knopp_deepseek_v4(logits: torch.Tensor, num_iterations: int, eps: float) -> torch.Tensor:
    """The Sinkhorn variant of transformers' `DeepseekV4HyperConnection`, returned as our `h_res`.

    There, `comb = softmax(logits, -1) + eps`, then a column normalisation and `num_iterations - 1` (row, column)
    rounds, each denominator `+ eps`; the result is applied as `In @ Comb`, i.e. `h_res = combᵀ`.
    """
    comb = torch.softmax(logits.float(), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(num_iterations - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb.transpose(-1, -2)


# --------------------------------------------------------------------------------------------------
# Stream mixing (paper §3, eq. 3)
# --------------------------------------------------------------------------------------------------
def hc_pre_mix(h_pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`Σ_j h_pre_j · x_j`: the sub-layer input read from the streams.

    `h_pre`: `[..., n]` (fp32; may broadcast over tokens); `x`: `[..., n, C]`. Returns `[..., C]` in `x.dtype`,
    accumulated in fp32.
    """
    return (h_pre.float().unsqueeze(-2) @ x.float()).squeeze(-2).to(x.dtype)


def hc_res_post_mix(
    h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, f: torch.Tensor
) -> torch.Tensor:
    """`h_res · x + h_postᵀ · f`: the streams after a sub-layer.

    `h_res`: `[..., n, n]` (row `i` says how much of each stream flows into stream `i`); `x`: `[..., n, C]` streams
    before the sub-layer; `h_post`: `[..., n]` weights writing the sub-layer output `f` (`[..., C]`) into each
    stream. Coefficients may broadcast over tokens. Returns `[..., n, C]` in `x.dtype`, accumulated in fp32.
    """
    mixed = h_res.float() @ x.float() + h_post.float().unsqueeze(-1) * f.float().unsqueeze(-2)
    return mixed.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Kernel or torch path: the decision every op family takes (`hyper_connection.mhc_implementation`, `decay_ops`)
# --------------------------------------------------------------------------------------------------
def _log_once(log, message: str) -> None:
    # Logging cannot be traced: a compiled graph would break at it. Compiling decides as eager does, which logs.
    if not torch.compiler.is_compiling():
        log(message)


def use_triton_kernels(
    family: str,
    kernel_backend: str,
    tensors: tuple[torch.Tensor, ...],
    launcher=None,
    unsupported: str | None = None,
) -> bool:
    """Whether the Triton kernels of `family` run on `tensors`: the dispatch decision of every op.

    Args:
        family: the kernel family, for messages (`"mhc"`, `"decay"`).
        kernel_backend: `"auto"`, `"torch"` or `"triton"` (the config field of both models).
        tensors: the op's tensor inputs (device and dtype decide).
        launcher: the family's `can_launch_on` (`None` when the kernels are not installed).
        unsupported: a family-specific reason the kernels cannot take these inputs (head dim, chunk size), if any.

    `"auto"` picks the kernels on CUDA tensors only (the interpreter, which runs them on CPU tensors, is for tests and
    is slow) and logs its choice once per family and reason. The kernels are registered custom ops
    (`torch.ops.transformers_mhc.*`), so `torch.compile` and selective checkpointing take each one whole: the same
    decision holds while compiling.
    """
    if kernel_backend == "torch":
        return False
    if kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(f"`kernel_backend` must be one of {list(KERNEL_BACKENDS)}, got {kernel_backend!r}.")
    if kernel_backend == "auto" and not any(t.is_cuda for t in tensors):
        # The common CPU case, decided cheaply: decoding asks once per sub-layer and token.
        _log_once(
            logger.info_once,
            f"kernel_backend='auto': the {family} ops run the torch path: {tensors[0].device.type} tensors.",
        )
        return False
    reason = _unsupported_inputs(launcher, tensors, cuda_only=kernel_backend == "auto") or unsupported
    if reason is None:
        if kernel_backend == "auto":
            _log_once(logger.info_once, f"kernel_backend='auto': the {family} ops run the Triton kernels.")
        return True
    if kernel_backend == "triton":
        raise ValueError(
            f"`kernel_backend='triton'` but the {family} Triton kernels cannot run here: {reason}. "
            "Use kernel_backend='auto' to fall back to the torch path."
        )
    _log_once(logger.warning_once, f"kernel_backend='auto': the {family} ops run the torch path: {reason}.")
    return False


def _unsupported_inputs(launcher, tensors: tuple[torch.Tensor, ...], cuda_only: bool) -> str | None:
    """Why the kernels cannot take these tensors, or `None` when they can (the checks every kernel shares)."""
    if launcher is None:
        return "the Triton kernels cannot be imported (triton >= 3.4 missing: `pip install 'transformers-mhc[triton]'`)"
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"the inputs are on several devices {sorted(str(d) for d in devices)}"
    (device,) = devices
    if cuda_only and device.type != "cuda":
        return f"{device.type} tensors"
    if not launcher(device):
        if device.type == "cpu":
            return "CPU tensors (Triton runs them only under TRITON_INTERPRET=1, set before the kernels are imported)"
        return f"{device.type} tensors in a process whose kernels were built for another device"
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if not dtypes <= set(TRITON_DTYPES):
        return (
            f"dtype {sorted(str(d) for d in dtypes - set(TRITON_DTYPES))} (the kernels take {TRITON_DTYPES})"
        )
    return None


__all__ = [
    "hc_pre_mix",
    "hc_res_post_mix",
    "mhc_coefficients",
    "num_streams_of",
    "sinkhorn_knopp",
    "sinkhorn_knopp_backward",
    "sinkhorn_knopp_deepseek_v4",
    "sinkhorn_log_iterates",
    "use_triton_kernels",
]
