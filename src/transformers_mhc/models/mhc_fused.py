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
"""The torch path of the hyper-connection ops: the formulas of `mhc_ops` with hand-written backwards.

Same signatures and results as the references in `mhc_ops` (tests compare them); faster in eager PyTorch, on CPU
above all, where many small kernels cost more than the arithmetic:

- every Function saves only its inputs, and its backward makes one pass per output gradient (batched matmuls,
  fused multiply-adds) instead of autograd's chain of elementwise kernels;
- Sinkhorn-Knopp runs with the batch innermost; for many matrices in the multiplicative form (2 cheap kernels per
  normalisation instead of a `log_softmax` with its `exp` and `log` per element), whenever the logits are within a
  range where its `exp` cannot underflow — the same function, proven below; wider logits, and few matrices without
  gradients (decoding), take the reference's log-space form.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .mhc_ops import (
    hc_pre_mix,
    mhc_coefficients,
    num_streams_of,
    sinkhorn_knopp,
    sinkhorn_knopp_backward,
    sinkhorn_log_iterates,
)


# --------------------------------------------------------------------------------------------------
# Coefficients
# --------------------------------------------------------------------------------------------------
def mhc_coefficients_fused(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, static_bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mhc_ops.mhc_coefficients` in one Function (without gradients: its forward alone)."""
    n = num_streams_of(phi)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    if _needs_grad(x, phi, alpha, static_bias):
        h_pre, h_post, res = MHCCoefficientsFunction.apply(x, phi, alpha, static_bias, eps)
    else:
        h_pre, h_post, res = _coefficient_outputs(x, phi, alpha, static_bias, eps)
    return h_pre.view(*lead, n), h_post.view(*lead, n), res.view(*lead, n, n)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    # Decoding runs without gradients: skipping the Function there saves its per-call overhead (a few µs, 8 per layer).
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _coefficients(x, phi, alpha, static_bias, eps):
    """The forward of `MHCCoefficientsFunction` on `[N, nC]`: the outputs, then what its backward needs."""
    n = num_streams_of(phi)
    xf = x.float()
    inv_rms = _inv_rms(xf, eps)
    raw = xf @ phi.float().t()
    gates = _gates(alpha, n)
    logits = (raw * inv_rms).mul_(gates).add_(static_bias.float())
    h_pre = torch.sigmoid(logits[:, :n])
    h_post = torch.sigmoid(logits[:, n : 2 * n]).mul_(2)
    res = logits[:, 2 * n :].contiguous()
    return h_pre, h_post, res, inv_rms, raw, gates


def _inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """`1 / rms(x)` over the last dimension, `[N, 1]`, in one reduction and four in-place steps."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


def _gates(alpha: torch.Tensor, n: int) -> torch.Tensor:
    """The fp32 gate of every logit: `alpha` (pre, post, res) repeated `n`, `n` and `n²` times."""
    alpha = alpha.float()
    return torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])


def _coefficient_outputs(x, phi, alpha, static_bias, eps):
    """`(h_pre, h_post, h_res logits)` of `_coefficients` without autograd, in fewer kernels: decoding runs this per
    token and sub-layer, where each kernel launch costs more than its arithmetic. The gates and the inverse RMS
    scale the projection in one multiply-add, and one sigmoid serves `h_pre` and `h_post` (both are views)."""
    n = num_streams_of(phi)
    xf = x.float()
    inv_rms = _inv_rms(xf, eps)
    logits = torch.addcmul(static_bias.float(), xf @ phi.float().t(), _gates(alpha, n) * inv_rms)
    gated = logits[:, : 2 * n].sigmoid()
    gated[:, n:].mul_(2)
    return gated[:, :n], gated[:, n:], logits[:, 2 * n :]


class MHCCoefficientsFunction(torch.autograd.Function):
    """`mhc_coefficients` on `[N, nC]` streams with a hand-written backward.

    The sum of squares is one reduction (`vector_norm`), nothing `nC`-wide is saved except the input itself (which
    the stream mixing saves anyway), and the input gradient is one matmul plus one fused multiply-add:
    `dx = (g/r) φ - (Σ g·(xφ)) / (r³ nC) · x` with `1/r` the inverse RMS.
    """

    @staticmethod
    def forward(ctx, x, phi, alpha, static_bias, eps):
        h_pre, h_post, res, inv_rms, raw, gates = _coefficients(x, phi, alpha, static_bias, eps)
        ctx.save_for_backward(x, phi, inv_rms, raw, gates, h_pre, h_post)
        ctx.meta = (num_streams_of(phi), x.shape[-1], alpha.dtype, static_bias.dtype)
        return h_pre, h_post, res

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pre, grad_post, grad_res):
        grad_x, grad_phi, grad_alpha, grad_bias = _coefficients_backward(
            ctx.saved_tensors, ctx.meta, ctx.needs_input_grad[:4], grad_pre, grad_post, grad_res
        )
        return (
            None if grad_x is None else grad_x.to(ctx.saved_tensors[0].dtype),
            grad_phi,
            grad_alpha,
            grad_bias,
            None,
        )


def _coefficients_backward(saved, meta, needs, grad_pre, grad_post, grad_res, grad_x_initial=None):
    """Gradients of `_coefficients` w.r.t. (x as fp32 `[N, nC]`, phi, alpha, static_bias), each `None` if not needed;
    the one of x is added to `grad_x_initial` (fp32 `[N, nC]`) when given."""
    x, phi, inv_rms, raw, gates, h_pre, h_post = saved
    n, width, alpha_dtype, bias_dtype = meta
    zeros = raw.new_zeros(raw.shape[0], n)
    grad_logits = torch.cat(
        [
            grad_pre.float() * h_pre * (1 - h_pre) if grad_pre is not None else zeros,
            grad_post.float() * h_post * (1 - h_post / 2) if grad_post is not None else zeros,
            grad_res.float() if grad_res is not None else raw.new_zeros(raw.shape[0], n * n),
        ],
        dim=-1,
    )
    grad_x = grad_phi = grad_alpha = grad_bias = None
    grad_proj = grad_logits * gates
    grad_raw = grad_proj * inv_rms
    if needs[0]:
        # d(1/r)/dx = -(1/r)³ x / nC
        coef = (grad_proj * raw).sum(dim=-1, keepdim=True) * inv_rms.pow(3) / -width
        if grad_x_initial is None:
            grad_x = (grad_raw @ phi.float()).addcmul_(x.float(), coef)
        else:  # a new buffer, so whatever autograd handed in stays untouched; the RMS term in the same pass
            grad_x = torch.addcmul(grad_x_initial, x.float(), coef).addmm_(grad_raw, phi.float())
    if needs[1]:
        grad_phi = (grad_raw.t() @ x.float()).to(phi.dtype)
    if needs[2]:
        per_gate = (grad_logits * (raw * inv_rms)).sum(dim=0)
        grad_alpha = torch.stack([per_gate[:n].sum(), per_gate[n : 2 * n].sum(), per_gate[2 * n :].sum()])
        grad_alpha = grad_alpha.to(alpha_dtype)
    if needs[3]:
        grad_bias = grad_logits.sum(dim=0).to(bias_dtype)
    return grad_x, grad_phi, grad_alpha, grad_bias


# --------------------------------------------------------------------------------------------------
# The read: coefficients and the normalised sub-layer input, one autograd node
# --------------------------------------------------------------------------------------------------
def mhc_read_fused(
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    static_bias: torch.Tensor,
    eps: float,
    norm: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`hyper_connection.compose_read` (the coefficients, `norm(hc_pre_mix(h_pre, x))` and the streams for the write)
    as one Function.

    A sub-layer's streams `x` feed the coefficients, the pre-mix and the write. Here they feed a single autograd node:
    the write takes the streams this node passes through, so their gradient reaches this node's backward, which adds
    every other term of `dL/dx` to it in the same buffer (autograd would give each consumer its own `[N, n, C]`
    gradient and then sum them). As with a checkpoint, neither the mixed input nor the norm's intermediates are
    kept: backward recomputes them from `x` and `h_pre`.
    """
    lead, (n, width) = x.shape[:-2], x.shape[-2:]
    flat = x.reshape(-1, n, width)
    use_function = torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if use_function:  # (the parameters are looked up only when training: decoding runs this per token)
        norm_params = [p for p in norm.parameters() if p.requires_grad] if isinstance(norm, nn.Module) else []
        use_function = _needs_grad(flat, phi, alpha, static_bias, *norm_params)
    if use_function:
        outputs = MHCReadFunction.apply(norm, flat, phi, alpha, static_bias, eps, *norm_params)
    else:
        # `_coefficient_outputs` works in place (no autograd graph to keep): decoding. Compiled training takes the
        # paper's coefficient formulas, which the compiler fuses anyway, and the compiled pre-mix below.
        coefficients = mhc_coefficients if torch.is_grad_enabled() else _coefficient_outputs
        pre_mix = _pre_mix_compiled if torch.compiler.is_compiling() else _pre_mix
        h_pre, h_post, res = coefficients(flat.reshape(-1, n * width), phi, alpha, static_bias, eps)
        outputs = (norm(pre_mix(h_pre, flat)), h_pre, h_post, res, flat)
    sublayer_input, h_pre, h_post, res, streams = outputs
    return (
        sublayer_input.view(*lead, -1),
        h_pre.view(*lead, n),
        h_post.view(*lead, n),
        res.view(*lead, n, n),
        streams.view(*lead, n, width),
    )


class MHCReadFunction(torch.autograd.Function):
    """`mhc_read_fused` on `[N, n, C]` streams: the coefficients' Function, the pre-mix and the norm in one node,
    which also passes the streams through (see `mhc_read_fused`).

    Backward reruns the pre-mix, then goes through the norm: in closed form for a stock `LlamaRMSNorm` (the norm of
    both models), by rerunning any other norm module under autograd (gradients of its input and of its parameters).
    It builds `dL/dx` in one buffer: the passed-through streams' gradient plus the coefficients' RMS term (one
    `addcmul`), then, in place, their projection term (`addmm_`) and the pre-mix's `h_pre ⊗ g`.
    """

    @staticmethod
    def forward(ctx, norm, x, phi, alpha, static_bias, eps, *norm_params):
        n_tokens, n, width = x.shape
        h_pre, h_post, res, inv_rms, raw, gates = _coefficients(
            x.reshape(n_tokens, n * width), phi, alpha, static_bias, eps
        )
        ctx.save_for_backward(x, phi, inv_rms, raw, gates, h_pre, h_post)
        ctx.meta = (n, n * width, alpha.dtype, static_bias.dtype)
        ctx.norm, ctx.norm_params = norm, norm_params
        return norm(_pre_mix(h_pre, x)), h_pre, h_post, res, x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_pre, grad_post, grad_res, grad_streams):
        x, phi, inv_rms, raw, gates, h_pre, h_post = ctx.saved_tensors
        grad_mixed = grad_params = None
        if grad_out is not None:  # through the norm, from the recomputed mixed input
            mixed = _pre_mix(h_pre, x)
            if _is_plain_rms_norm(ctx.norm):
                grad_mixed, grad_weight = _rms_norm_backward(ctx.norm, mixed, grad_out, bool(ctx.norm_params))
                grad_params = [grad_weight] if ctx.norm_params else []
            else:  # any other norm: rerun it under autograd
                mixed.requires_grad_(True)
                with torch.enable_grad():
                    out = ctx.norm(mixed)
                grad_mixed, *grad_params = torch.autograd.grad(
                    out, (mixed, *ctx.norm_params), grad_out, allow_unused=True
                )
            # Through the pre-mix `Σ_j h_pre_j x_j`: to h_pre (a dot product per stream), and to x below.
            grad_mixed = grad_mixed.float().contiguous()
            grad_h = _stream_dots(grad_mixed, x)
            grad_pre = grad_h if grad_pre is None else grad_pre.float() + grad_h
        needs = (ctx.needs_input_grad[1], *ctx.needs_input_grad[2:5])
        saved = (x.reshape(x.shape[0], -1), phi, inv_rms, raw, gates, h_pre, h_post)
        initial = None if grad_streams is None else grad_streams.reshape(x.shape[0], -1).float()
        grad_x, grad_phi, grad_alpha, grad_bias = _coefficients_backward(
            saved, ctx.meta, needs, grad_pre, grad_post, grad_res, initial
        )
        if grad_x is not None:
            grad_x = grad_x.view_as(x)
            if grad_mixed is not None:
                grad_x.addcmul_(h_pre.unsqueeze(-1), grad_mixed.unsqueeze(-2))
            grad_x = grad_x.to(x.dtype)
        grad_params = grad_params or [None] * len(ctx.norm_params)
        return None, grad_x, grad_phi, grad_alpha, grad_bias, None, *grad_params


def _is_plain_rms_norm(norm: Callable) -> bool:
    """Whether `norm` is transformers' `LlamaRMSNorm` as it ships (its class's forward, no hooks): then its backward
    is the closed form of `_rms_norm_backward`; anything else (another norm, a patched or hooked one) is rerun under
    autograd instead."""
    return (
        type(norm) is LlamaRMSNorm
        and LlamaRMSNorm.forward is _LLAMA_RMS_NORM_FORWARD
        and "forward" not in vars(norm)  # accelerate's hooks replace an instance's forward
        # `nn.Module`'s hook registries; should one ever be missing, count it as hooked (the general path)
        and not any(getattr(norm, name, True) for name in _MODULE_HOOKS)
    )


_LLAMA_RMS_NORM_FORWARD = LlamaRMSNorm.forward
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _rms_norm_backward(
    norm: LlamaRMSNorm, mixed: torch.Tensor, grad_out: torch.Tensor, weight_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of `y = w · x̂`, `x̂ = x / rms(x)` (`LlamaRMSNorm`, in fp32) w.r.t. its input `mixed` and, with
    `weight_grad`, its weight: `dx = (g·w - x̂ · mean(g·w·x̂)) / rms(x)`, `dw = Σ_tokens g · x̂`.

    Elementwise passes over `[N, C]` without autograd, instead of rerunning the norm's forward under autograd and
    its backward graph (on CPU, with the pre-mix that recomputes `mixed`: 1.7 against 3.6 ms per sub-layer at 512
    tokens, hidden 1024)."""
    mixed = mixed.float()
    inv_rms = _inv_rms(mixed, norm.variance_epsilon)
    normed = mixed.mul_(inv_rms)  # `mixed` is ours: a fresh result of the pre-mix
    grad = grad_out.float()
    grad_normed = grad * norm.weight.float()
    dot = torch.linalg.vecdot(grad_normed, normed).unsqueeze(-1)
    grad_mixed = grad_normed.mul_(inv_rms).addcmul_(normed, dot.mul_(inv_rms).div_(-normed.shape[-1]))
    grad_weight = (grad * normed).sum(dim=0).to(norm.weight.dtype) if weight_grad else None
    return grad_mixed, grad_weight


# --------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp, multiplicative form
# --------------------------------------------------------------------------------------------------
# When every matrix's logits lie within this range of each other, the smallest entry of any iterate stays far above
# fp32's smallest normal number (the cross-ratios m_ij m_kl / (m_il m_kj) do not change under row and column
# scaling, which bounds every entry below by about exp(-2 * range) / n^4), so the multiplicative and the log-space
# forms agree to rounding.
MULTIPLICATIVE_LOGIT_RANGE = 30.0
# Up to this many matrices, without gradients (decoding, short prefills), the log-space form is the faster one: one
# kernel per normalisation (`log_softmax`) against two, and no range check (a host sync). Beyond it, its `exp` and
# `log` per element cost more than the saved kernel launches (measured on CPU: 3.4x faster for one matrix, even at 512,
# 1.6x slower at 8192).
LOG_SPACE_MAX_MATRICES = 512


def sinkhorn_knopp_fused(logits: torch.Tensor, num_iterations: int = 20) -> torch.Tensor:
    """`mhc_ops.sinkhorn_knopp`, multiplicative where that is exact to rounding (a data-dependent check: eager only,
    compiled code keeps the reference's branch-free log-space form)."""
    if torch.compiler.is_compiling() or logits.dtype == torch.float64 or logits.numel() == 0:
        return sinkhorn_knopp(logits, num_iterations)
    z = _batch_last(logits.float())
    needs_grad = _needs_grad(logits)
    if z.shape[-1] <= LOG_SPACE_MAX_MATRICES and not needs_grad:
        log_matrix = sinkhorn_log_iterates(z, num_iterations, keep=False, dims=(0, 1))[0]
        return _from_batch_last(log_matrix.exp_(), logits.shape)
    if not _multiplicative_is_exact(z):
        return sinkhorn_knopp(logits, num_iterations)
    if needs_grad:
        return _from_batch_last(MultiplicativeSinkhornFunction.apply(z, num_iterations), logits.shape)
    return _from_batch_last(_multiplicative_iterates(z, num_iterations, keep=False)[0], logits.shape)


def sinkhorn_knopp_fused_backward(
    logits: torch.Tensor, grad: torch.Tensor, num_iterations: int = 20
) -> torch.Tensor:
    """The gradient of `sinkhorn_knopp_fused` w.r.t. its logits (in their dtype) for the output gradient `grad`,
    without autograd: the multiplicative backward where the multiplicative form is exact, the reference's
    log-space one elsewhere (`transformers_mhc.sinkhorn_op` registers the pair as ops for `torch.compile`)."""
    if logits.dtype == torch.float64 or logits.numel() == 0:
        return sinkhorn_knopp_backward(logits, grad.to(logits.dtype), num_iterations)
    z = _batch_last(logits.float())
    if not _multiplicative_is_exact(z):
        return sinkhorn_knopp_backward(logits.float(), grad.float(), num_iterations).to(logits.dtype)
    grad = _multiplicative_backward(z, _batch_last(grad.float()), num_iterations)
    return _from_batch_last(grad, logits.shape).to(logits.dtype)


def _multiplicative_is_exact(z: torch.Tensor) -> bool:
    """Whether every `[n, n, N]` matrix's logits lie within `MULTIPLICATIVE_LOGIT_RANGE` (a host sync)."""
    spread = (z.amax(dim=(0, 1)) - z.amin(dim=(0, 1))).max()
    return float(spread.detach()) <= MULTIPLICATIVE_LOGIT_RANGE


def _batch_last(matrices: torch.Tensor) -> torch.Tensor:
    """`[..., n, n]` -> `[n, n, N]`: the batch contiguous and innermost, so that on CPU every reduction and every
    broadcasting division runs over contiguous length-`N` vectors instead of strided size-`n` dimensions."""
    n = matrices.shape[-1]
    if matrices.numel() == n * n:  # one matrix (decoding): a view, no copy
        return matrices.reshape(n, n, 1)
    return matrices.reshape(-1, n, n).permute(1, 2, 0).contiguous()


def _from_batch_last(matrices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Contiguous again: batched matmuls over batch-strided matrices fall back to one small matmul per token.
    if matrices.shape[-1] == 1:
        return matrices.view(shape)
    return matrices.permute(2, 0, 1).contiguous().view(shape)


def _multiplicative_iterates(z: torch.Tensor, num_iterations: int, keep: bool):
    """`exp(z - max)`, then alternate column and row normalisations by division, on `[n (i), n (j), N]`.

    Returns the result, the first matrix and, with `keep` (for backward), every normalisation's `(output, sums)`.
    """
    m = torch.exp(z - z.amax(dim=(0, 1), keepdim=True))
    first, steps = m, []
    for step in range(2 * num_iterations):  # columns (sum over i), then rows (sum over j; last: exact rows)
        sums = m.sum(dim=step % 2, keepdim=True)
        if keep:
            m = m / sums
            steps.append((m, sums))
        else:
            m = m.div_(sums)
    return m, first, steps


class MultiplicativeSinkhornFunction(torch.autograd.Function):
    """Multiplicative Sinkhorn-Knopp on `[n, n, N]` logits, saving only them; backward recomputes the iterates.

    For `y = m / s` with `s = Σ_d m`: `dL/dm = (g - Σ_d g·y) / s`; through `m = exp(z - max)`, `dL/dz = m · dL/dm`
    (the max is a constant shift that the normalisations cancel, so it carries no gradient).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, num_iterations: int) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.num_iterations = num_iterations
        return _multiplicative_iterates(z, num_iterations, keep=False)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (z,) = ctx.saved_tensors
        # The gradient arrives permuted (the batch-last layout is undone outside).
        return _multiplicative_backward(z, grad.float().contiguous(), ctx.num_iterations), None


def _multiplicative_backward(z: torch.Tensor, grad: torch.Tensor, num_iterations: int) -> torch.Tensor:
    """`dL/dz` of `_multiplicative_iterates` on `[n, n, N]` logits `z` for the output gradient `grad` (same layout,
    fp32, contiguous; overwritten), recomputing the iterates."""
    _, first, steps = _multiplicative_iterates(z, num_iterations, keep=True)
    for step in range(len(steps) - 1, -1, -1):
        y, sums = steps[step]
        grad = (grad - (grad * y).sum(dim=step % 2, keepdim=True)).div_(sums)
    return grad.mul_(first)


# --------------------------------------------------------------------------------------------------
# Stream mixing
# --------------------------------------------------------------------------------------------------
# Under `torch.compile` the stream mixes are written as products broadcast over the stream axis and summed over it:
# inductor fuses each into one pass over the streams, with the `h_post ⊗ f` term (or the norm after the pre-mix) in
# the same loop, where a batched matmul stays a library call with passes of its own. Eager PyTorch would materialise
# the products, so it keeps the matmul forms. (Compiled prefill of 512 tokens at hidden 1024, ÷ compiled Llama:
# 1.11× with the matmul forms, 1.07× with these.)
def _pre_mix_compiled(h_pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (h_pre.float().unsqueeze(-1) * x.float()).sum(dim=-2).to(x.dtype)


def _res_post_mix_compiled(
    h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, f: torch.Tensor
) -> torch.Tensor:
    mixed = (h_res.float().unsqueeze(-1) * x.float().unsqueeze(-3)).sum(dim=-2)
    return (mixed + h_post.float().unsqueeze(-1) * f.float().unsqueeze(-2)).to(x.dtype)


def hc_pre_mix_fused(h_pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`mhc_ops.hc_pre_mix` as batched `[1, n] @ [n, C]` products (without gradients: the formula itself)."""
    if torch.compiler.is_compiling():
        return _pre_mix_compiled(h_pre, x)
    if not _needs_grad(h_pre, x):
        return hc_pre_mix(h_pre, x)
    lead, (n, width) = x.shape[:-2], x.shape[-2:]
    h_pre = h_pre.float().expand(*lead, n).reshape(-1, n)  # broadcast: expand's backward sums the gradient
    return HCPreMixFunction.apply(h_pre, x.reshape(-1, n, width)).view(*lead, width)


def _pre_mix(h_pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`hc_pre_mix` on `[N, n]` (fp32) and `[N, n, C]`: one batched matmul (the formula's broadcasting `matmul`
    costs a few more kernels, which decoding pays per token)."""
    return torch.bmm(h_pre.unsqueeze(1), x.float()).squeeze(1).to(x.dtype)


def _stream_dots(vector: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """`[N, n]` fp32: each token's `[C]` vector dotted with each of its `n` streams (`[N, n, C]`), the gradient of a
    per-token mixing coefficient. As `[1, C] @ [C, n]` per token: on CPU twice as fast as `[n, C] @ [C, 1]`."""
    return torch.bmm(vector.float().unsqueeze(1), streams.float().transpose(1, 2)).squeeze(1)


class HCPreMixFunction(torch.autograd.Function):
    """`hc_pre_mix` on `[N, n]` (fp32) and `[N, n, C]`, saving only the inputs."""

    @staticmethod
    def forward(ctx, h_pre, x):
        ctx.save_for_backward(h_pre, x)
        return _pre_mix(h_pre, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h_pre, x = ctx.saved_tensors
        grad = grad.float().contiguous()
        grad_h = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_h = _stream_dots(grad, x)
        if ctx.needs_input_grad[1]:
            grad_x = (h_pre.unsqueeze(2) * grad.unsqueeze(1)).to(x.dtype)  # outer product, one pass
        return grad_h, grad_x


def hc_res_post_mix_fused(
    h_res: torch.Tensor, x: torch.Tensor, h_post: torch.Tensor, f: torch.Tensor
) -> torch.Tensor:
    """`mhc_ops.hc_res_post_mix` in one batched matmul and one fused multiply-add."""
    if torch.compiler.is_compiling():
        return _res_post_mix_compiled(h_res, x, h_post, f)
    if not _needs_grad(
        h_res, x, h_post, f
    ):  # broadcasting matmul: no per-token expansion of the coefficients
        mixed = h_res.float() @ x.float()
        return mixed.addcmul_(h_post.float().unsqueeze(-1), f.float().unsqueeze(-2)).to(x.dtype)
    lead, (n, width) = x.shape[:-2], x.shape[-2:]
    lead = torch.broadcast_shapes(lead, f.shape[:-1])
    # Broadcast coefficients are expanded per token (the backward of `expand` sums their gradients).
    h_res = h_res.float().expand(*lead, n, n).reshape(-1, n, n)
    h_post = h_post.float().expand(*lead, n).reshape(-1, n)
    x = x.expand(*lead, n, width).reshape(-1, n, width)
    f = f.expand(*lead, width).reshape(-1, width)
    return HCResPostMixFunction.apply(h_res, x, h_post, f).view(*lead, n, width)


class HCResPostMixFunction(torch.autograd.Function):
    """`hc_res_post_mix` on `[N, ...]` tensors: four batched matmuls in backward, no `[N, n, C]` temporaries besides
    the input gradient; saves only the inputs."""

    @staticmethod
    def forward(ctx, h_res, x, h_post, f):
        ctx.save_for_backward(h_res, x, h_post, f)
        mixed = torch.bmm(h_res, x.float())
        return mixed.addcmul_(h_post.unsqueeze(-1), f.float().unsqueeze(-2)).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h_res, x, h_post, f = ctx.saved_tensors
        # Contiguous: e.g. the mean readout's gradient is a stride-0 broadcast, on which batched matmuls fall back to
        # one small matmul (and copy) per token.
        grad = grad.float().contiguous()
        grad_res = grad_x = grad_post = grad_f = None
        if ctx.needs_input_grad[0]:
            grad_res = torch.bmm(grad, x.float().transpose(1, 2))
        if ctx.needs_input_grad[1]:
            grad_x = torch.bmm(h_res.transpose(1, 2), grad).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_post = _stream_dots(f, grad)
        if ctx.needs_input_grad[3]:
            grad_f = torch.bmm(h_post.unsqueeze(1), grad).squeeze(1).to(f.dtype)
        return grad_res, grad_x, grad_post, grad_f


__all__ = [
    "HCPreMixFunction",
    "HCResPostMixFunction",
    "MHCCoefficientsFunction",
    "MultiplicativeSinkhornFunction",
    "hc_pre_mix_fused",
    "MHCReadFunction",
    "hc_res_post_mix_fused",
    "mhc_coefficients_fused",
    "mhc_read_fused",
    "sinkhorn_knopp_fused",
    "sinkhorn_knopp_fused_backward",
]
