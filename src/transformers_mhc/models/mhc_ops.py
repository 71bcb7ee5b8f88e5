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
"""Pure-PyTorch hyper-connection arithmetic (mHC paper §3 and §5), and dispatch to the Triton kernels.

These are the references of the kernels in `transformers_mhc.kernels.mhc`; every function here takes the
same arguments as its kernel and is what runs on CPU tensors (and in checkpoints loaded with
`trust_remote_code` where the package is not installed).

Shapes: `N` is any number of leading token dimensions, `n` the number of streams, `C` the hidden size.

- `mhc_coefficients(x, phi, alpha, static_bias, eps)`: (h_pre, h_post, h_res logits) from the streams
- `sinkhorn_knopp(logits, num_iterations)`: doubly stochastic `h_res`, exact row sums, recomputing backward
- `hc_pre_mix(h_pre, x)`: the sub-layer input `Σ_j h_pre_j x_j`
- `hc_res_post_mix(h_res, x, h_post, f)`: the new streams `h_res · x + h_postᵀ · f`
"""

from __future__ import annotations

import torch

try:  # The Triton fast path is optional: absent where the package is not installed (remote code).
    from transformers_mhc.kernels.mhc import (
        hc_pre_mix_triton,
        hc_res_post_mix_triton,
        mhc_coefficients_triton,
        sinkhorn_knopp_triton,
    )
except ImportError:
    hc_pre_mix_triton = hc_res_post_mix_triton = mhc_coefficients_triton = sinkhorn_knopp_triton = None


def _use_triton(kernel, *tensors: torch.Tensor) -> bool:
    # Triton kernels only launch on GPUs; on CPU tensors (even with Triton installed) use the torch path.
    return kernel is not None and all(t.is_cuda for t in tensors) and not torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# --------------------------------------------------------------------------------------------------
def _sinkhorn_log_iterates(logits: torch.Tensor, num_iterations: int, keep: bool) -> list[torch.Tensor]:
    """Log-space Sinkhorn-Knopp. Returns the final log-matrix, or every iterate when `keep` (for backward).

    Working in log space (each normalisation subtracts a logsumexp) keeps every step finite even for
    logits of ±1e4, where `exp` would under- or overflow.
    """
    z = logits
    iterates = [z] if keep else []
    for _ in range(num_iterations):
        z = z - torch.logsumexp(z, dim=-2, keepdim=True)  # columns sum to 1
        if keep:
            iterates.append(z)
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)  # rows sum to 1 (last, so rows are exact)
        if keep:
            iterates.append(z)
    return iterates if keep else [z]


def sinkhorn_knopp_backward(
    logits: torch.Tensor, grad_out: torch.Tensor, num_iterations: int
) -> torch.Tensor:
    """Exact gradient of `sinkhorn_knopp` w.r.t. its (fp32) logits, recomputing the iterations.

    For a normalisation `y = x - logsumexp_d(x)`, `dL/dx = g - exp(y) · Σ_d g`; the iterates are
    recomputed here instead of being stored by the forward, so saved memory does not grow with the
    number of iterations.
    """
    iterates = _sinkhorn_log_iterates(logits, num_iterations, keep=True)
    grad = grad_out * iterates[-1].exp()  # through the final exp
    # iterates[1:] alternate column (odd index) and row (even index) normalisations.
    for step in range(len(iterates) - 1, 0, -1):
        dim = -2 if step % 2 == 1 else -1
        grad = grad - iterates[step].exp() * grad.sum(dim=dim, keepdim=True)
    return grad


class SinkhornKnoppFunction(torch.autograd.Function):
    """Sinkhorn-Knopp in fp32 whose backward recomputes the iterations (only the logits are saved)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, num_iterations: int) -> torch.Tensor:
        # fp32 at least (float64 is kept, for gradcheck)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        ctx.save_for_backward(logits)
        ctx.num_iterations = num_iterations
        return _sinkhorn_log_iterates(logits, num_iterations, keep=False)[0].exp()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return sinkhorn_knopp_backward(logits, grad_out.to(logits.dtype), ctx.num_iterations), None


def sinkhorn_knopp(logits: torch.Tensor, num_iterations: int = 20) -> torch.Tensor:
    """Projects `exp(logits)` (`[..., n, n]`) towards the doubly stochastic matrices (the Birkhoff polytope).

    Each iteration normalises the columns, then the rows, so the row sums of the result are exact and the column
    sums converge. Computed in fp32 whatever the input dtype.
    """
    if _use_triton(sinkhorn_knopp_triton, logits):
        return sinkhorn_knopp_triton(logits, num_iterations)
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
# Coefficients (paper §3, §5.1-5.2)
# --------------------------------------------------------------------------------------------------
def mhc_coefficients(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, static_bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mHC coefficients from the flattened streams.

    Args:
        x: `[N, n*C]` flattened streams (any dtype; computed in fp32).
        phi: `[n*n + 2n, n*C]` fused projection, rows ordered (pre, post, res).
        alpha: `[3]` gates (pre, post, res).
        static_bias: `[n*n + 2n]` static logits, same order.
        eps: RMSNorm epsilon.

    Returns:
        `h_pre = sigmoid(·)` `[N, n]`, `h_post = 2·sigmoid(·)` `[N, n]` and the `h_res` logits `[N, n, n]`
        (fed to `sinkhorn_knopp`). The RMSNorm division is applied after the matmul (§5.1): `(x φ) / r`.
    """
    if _use_triton(mhc_coefficients_triton, x, phi):
        return mhc_coefficients_triton(x, phi, alpha, static_bias, eps)
    n = _num_streams(phi.shape[0])
    x = x.float()
    inv_rms = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    proj = (x @ phi.float().t()) * inv_rms
    alpha = alpha.float()
    gates = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])
    logits = proj * gates + static_bias.float()
    pre, post, res = logits.split([n, n, n * n], dim=-1)
    return torch.sigmoid(pre), 2 * torch.sigmoid(post), res.unflatten(-1, (n, n))


def _num_streams(width: int) -> int:
    # width = n*n + 2n  =>  n = sqrt(width + 1) - 1
    n = round((width + 1) ** 0.5) - 1
    if n * n + 2 * n != width:
        raise ValueError(f"a fused hyper-connection projection has n*n + 2n rows, got {width}")
    return n


# --------------------------------------------------------------------------------------------------
# Stream mixing (paper §5.4-5.5)
# --------------------------------------------------------------------------------------------------
def hc_pre_mix(h_pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`Σ_j h_pre_j · x_j`: the sub-layer input read from the streams.

    Args:
        h_pre: `[..., n]` (fp32; may broadcast over tokens).
        x: `[..., n, C]` streams.

    Returns:
        `[..., C]` in `x.dtype`, accumulated in fp32.
    """
    if _use_triton(hc_pre_mix_triton, h_pre, x):
        return hc_pre_mix_triton(h_pre, x)
    return torch.matmul(h_pre.float().unsqueeze(-2), x.float()).squeeze(-2).to(x.dtype)


def hc_res_post_mix(
    h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, f: torch.Tensor
) -> torch.Tensor:
    """`h_res · x + h_postᵀ · f`: the streams after a sub-layer, in one pass.

    Args:
        h_res: `[..., n, n]` (row `i` says how much of each stream flows into stream `i`).
        x: `[..., n, C]` streams before the sub-layer.
        h_post: `[..., n]` weights writing the sub-layer output into each stream.
        f: `[..., C]` sub-layer output.

    Returns:
        `[..., n, C]` in `x.dtype`, accumulated in fp32.
    """
    if _use_triton(hc_res_post_mix_triton, h_res, x, h_post, f):
        return hc_res_post_mix_triton(h_res, x, h_post, f)
    mixed = torch.matmul(h_res.float(), x.float()) + h_post.float().unsqueeze(-1) * f.float().unsqueeze(-2)
    return mixed.to(x.dtype)


__all__ = [
    "SinkhornKnoppFunction",
    "hc_pre_mix",
    "hc_res_post_mix",
    "mhc_coefficients",
    "sinkhorn_knopp",
    "sinkhorn_knopp_backward",
    "sinkhorn_knopp_deepseek_v4",
]
