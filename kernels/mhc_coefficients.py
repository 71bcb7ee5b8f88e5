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
"""The fused mHC coefficient kernel (paper §5.1-5.2) and its backward, in Triton.

Reference: `mhc_coefficients` in `transformers_mhc.models.mhc_ops`. One pass over the flattened streams `x`
(`[N, nC]`) accumulates both `x φᵀ` and `Σ x²`; the RMSNorm division is applied to the `n² + 2n` projected
values after the matmul, and the gates, static biases and sigmoids are applied in the same program, so `x` is
read once and never normalised in memory.

Backward, with `r = rsqrt(mean(x²) + eps)`, `p = r · (x φᵀ)` and `dp` the gradient reaching `p`:
`dx = (r·dp) φ - (r²/nC) (Σ_m dp·p) x` and `dφ = (r·dp)ᵀ x`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .runtime import device_guard

# tl.dot needs every dimension >= 16.
_MIN_DOT = 16
_BLOCK_T = 16


def _block_k(mp: int) -> int:
    """K-chunk width: 64, narrowed for large n so the [BLOCK_K, MP] phi tile stays within shared memory."""
    return max(_MIN_DOT, min(64, 4096 // mp))


@triton.jit
def _gates_and_bias(alpha_ptr, bias_ptr, m, N: tl.constexpr, M: tl.constexpr):
    """Per-column gate (alpha_pre | alpha_post | alpha_res) and static bias of the fused [pre | post | res] row."""
    a_pre = tl.load(alpha_ptr).to(tl.float32)
    a_post = tl.load(alpha_ptr + 1).to(tl.float32)
    a_res = tl.load(alpha_ptr + 2).to(tl.float32)
    gate = tl.where(m < N, a_pre, tl.where(m < 2 * N, a_post, a_res))
    bias = tl.load(bias_ptr + m, mask=m < M, other=0.0).to(tl.float32)
    return gate, bias


@triton.jit
def _coefficients_fwd_kernel(
    x_ptr,
    phi_ptr,
    alpha_ptr,
    bias_ptr,
    pre_ptr,
    post_ptr,
    res_ptr,
    proj_ptr,
    inv_rms_ptr,
    num_tokens,
    K,
    eps,
    N: tl.constexpr,
    M: tl.constexpr,
    MP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    m = tl.arange(0, MP)
    t_ok = t < num_tokens
    acc = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
    ssq = tl.zeros([BLOCK_T], dtype=tl.float32)
    # One sweep over x: the projection and the sum of squares share every load (§5.1).
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xb = tl.load(x_ptr + t[:, None] * K + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        xb = xb.to(tl.float32)
        # phi is [M, K] row-major; read it as its transpose [BLOCK_K, MP].
        pb = tl.load(phi_ptr + m[None, :] * K + k[:, None], mask=k_ok[:, None] & (m[None, :] < M), other=0.0)
        # "ieee": the reference is a true fp32 matmul, TF32 would lose ~3 decimal digits.
        acc = tl.dot(xb, pb.to(tl.float32), acc, input_precision="ieee")
        ssq += tl.sum(xb * xb, axis=1)
    inv_rms = 1.0 / tl.sqrt(ssq / K + eps)
    proj = acc * inv_rms[:, None]  # RMSNorm applied after the matmul
    gate, bias = _gates_and_bias(alpha_ptr, bias_ptr, m, N, M)
    logits = proj * gate[None, :] + bias[None, :]
    sig = tl.sigmoid(logits)
    t2 = t[:, None]
    m2 = m[None, :]
    tl.store(pre_ptr + t2 * N + m2, sig, mask=t_ok[:, None] & (m2 < N))
    tl.store(post_ptr + t2 * N + (m2 - N), 2.0 * sig, mask=t_ok[:, None] & (m2 >= N) & (m2 < 2 * N))
    tl.store(res_ptr + t2 * (N * N) + (m2 - 2 * N), logits, mask=t_ok[:, None] & (m2 >= 2 * N) & (m2 < M))
    # Saved for backward: N·(n²+2n+1) floats, tiny next to x (N·nC).
    tl.store(proj_ptr + t2 * M + m2, proj, mask=t_ok[:, None] & (m2 < M))
    tl.store(inv_rms_ptr + t, inv_rms, mask=t_ok)


@triton.jit
def _coefficients_bwd_x_kernel(
    x_ptr,
    phi_ptr,
    alpha_ptr,
    bias_ptr,
    proj_ptr,
    inv_rms_ptr,
    grad_pre_ptr,
    grad_post_ptr,
    grad_res_ptr,
    grad_x_ptr,
    grad_acc_ptr,
    part_bias_ptr,
    part_gate_ptr,
    num_tokens,
    K,
    N: tl.constexpr,
    M: tl.constexpr,
    MP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    m = tl.arange(0, MP)
    t_ok = t < num_tokens
    t2 = t[:, None]
    m2 = m[None, :]
    row_ok = t_ok[:, None] & (m2 < M)
    proj = tl.load(proj_ptr + t2 * M + m2, mask=row_ok, other=0.0)
    inv_rms = tl.load(inv_rms_ptr + t, mask=t_ok, other=0.0)
    gate, bias = _gates_and_bias(alpha_ptr, bias_ptr, m, N, M)
    sig = tl.sigmoid(proj * gate[None, :] + bias[None, :])
    is_pre = m2 < N
    is_post = (m2 >= N) & (m2 < 2 * N)
    is_res = (m2 >= 2 * N) & (m2 < M)
    g_pre = tl.load(grad_pre_ptr + t2 * N + m2, mask=t_ok[:, None] & is_pre, other=0.0)
    g_post = tl.load(grad_post_ptr + t2 * N + (m2 - N), mask=t_ok[:, None] & is_post, other=0.0)
    g_res = tl.load(grad_res_ptr + t2 * (N * N) + (m2 - 2 * N), mask=t_ok[:, None] & is_res, other=0.0)
    dsig = sig * (1.0 - sig)
    # Gradient w.r.t. the fused logits: sigmoid' for pre, 2·sigmoid' for post, identity for res.
    dlogits = tl.where(is_pre, g_pre * dsig, tl.where(is_post, 2.0 * g_post * dsig, g_res))
    dlogits = tl.where(row_ok, dlogits, 0.0)
    # Per-block partial sums (reduced on the host): deterministic, no atomics.
    tl.store(part_bias_ptr + pid * MP + m, tl.sum(dlogits, axis=0))
    tl.store(part_gate_ptr + pid * MP + m, tl.sum(dlogits * proj, axis=0))
    dproj = dlogits * gate[None, :]
    # d/dx of the norm: r = (Σx²/K + eps)^-1/2 contributes -(r²/K)(Σ_m dproj·proj) x.
    coef = -tl.sum(dproj * proj, axis=1) * inv_rms * inv_rms / K
    dacc = dproj * inv_rms[:, None]
    tl.store(grad_acc_ptr + t2 * MP + m2, dacc, mask=t_ok[:, None])
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x_mask = t_ok[:, None] & k_ok[None, :]
        xb = tl.load(x_ptr + t2 * K + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
        pb = tl.load(phi_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & k_ok[None, :], other=0.0)
        dx = tl.dot(dacc, pb.to(tl.float32), input_precision="ieee") + coef[:, None] * xb
        tl.store(grad_x_ptr + t2 * K + k[None, :], dx.to(grad_x_ptr.dtype.element_ty), mask=x_mask)


@triton.jit
def _coefficients_bwd_phi_kernel(
    x_ptr,
    grad_acc_ptr,
    grad_phi_ptr,
    num_tokens,
    K,
    M: tl.constexpr,
    MP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dφ[:, k-block] = Σ_t dacc[t]ᵀ x[t, k-block]: each program owns a column block, so no atomics.
    k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    m = tl.arange(0, MP)
    acc = tl.zeros([MP, BLOCK_K], dtype=tl.float32)
    for t0 in range(0, num_tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        t_ok = t < num_tokens
        da_t = tl.load(grad_acc_ptr + t[None, :] * MP + m[:, None], mask=t_ok[None, :], other=0.0)
        xb = tl.load(x_ptr + t[:, None] * K + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(da_t, xb.to(tl.float32), acc, input_precision="ieee")
    tl.store(
        grad_phi_ptr + m[:, None] * K + k[None, :],
        acc.to(grad_phi_ptr.dtype.element_ty),
        mask=(m[:, None] < M) & k_ok[None, :],
    )


def _num_streams(width: int) -> int:
    n = round((width + 1) ** 0.5) - 1
    if n < 1 or n * n + 2 * n != width:
        raise ValueError(f"a fused hyper-connection projection has n*n + 2n rows, got {width}")
    return n


class MHCCoefficientsTritonFunction(torch.autograd.Function):
    """Fused projection + RMS + gates + sigmoids; saves x, φ and the `[N, n²+2n]` normalised projection."""

    @staticmethod
    def forward(ctx, x, phi, alpha, static_bias, eps: float):
        width, K = phi.shape
        n = _num_streams(width)
        lead = x.shape[:-1]
        x2 = x.contiguous().view(-1, K)
        phi_c = phi.contiguous()
        alpha_c = alpha.contiguous()
        bias_c = static_bias.contiguous()
        T = x2.shape[0]
        dev = x.device
        pre = torch.empty(T, n, device=dev, dtype=torch.float32)
        post = torch.empty(T, n, device=dev, dtype=torch.float32)
        res = torch.empty(T, n, n, device=dev, dtype=torch.float32)
        proj = torch.empty(T, width, device=dev, dtype=torch.float32)
        inv_rms = torch.empty(T, device=dev, dtype=torch.float32)
        mp = max(_MIN_DOT, triton.next_power_of_2(width))
        if T > 0:
            with device_guard(x2):
                _coefficients_fwd_kernel[(triton.cdiv(T, _BLOCK_T),)](
                    x2, phi_c, alpha_c, bias_c, pre, post, res, proj, inv_rms, T, K, float(eps),
                    N=n, M=width, MP=mp, BLOCK_T=_BLOCK_T, BLOCK_K=_block_k(mp),
                )  # fmt: skip
        ctx.save_for_backward(x2, phi_c, alpha_c, bias_c, proj, inv_rms)
        ctx.lead = lead
        ctx.x_shape = x.shape
        return pre.view(*lead, n), post.view(*lead, n), res.view(*lead, n, n)

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, grad_pre, grad_post, grad_res):
        x2, phi, alpha, bias, proj, inv_rms = ctx.saved_tensors
        width, K = phi.shape
        n = _num_streams(width)
        T = x2.shape[0]
        dev = x2.device
        mp = max(_MIN_DOT, triton.next_power_of_2(width))
        block_k = _block_k(mp)
        blocks = triton.cdiv(T, _BLOCK_T)
        grad_x = torch.empty_like(x2)
        grad_acc = torch.empty(T, mp, device=dev, dtype=torch.float32)
        part_bias = torch.zeros(blocks, mp, device=dev, dtype=torch.float32)
        part_gate = torch.zeros(blocks, mp, device=dev, dtype=torch.float32)
        # A frozen phi (e.g. PEFT without modules_to_save) skips the reduction over tokens entirely.
        want_phi = ctx.needs_input_grad[1]
        grad_phi = torch.zeros_like(phi) if want_phi and T == 0 else None
        if T > 0:
            with device_guard(x2):
                _coefficients_bwd_x_kernel[(blocks,)](
                    x2, phi, alpha, bias, proj, inv_rms,
                    grad_pre.float().contiguous(), grad_post.float().contiguous(), grad_res.float().contiguous(),
                    grad_x, grad_acc, part_bias, part_gate, T, K,
                    N=n, M=width, MP=mp, BLOCK_T=_BLOCK_T, BLOCK_K=block_k,
                )  # fmt: skip
                if want_phi:
                    grad_phi = torch.empty_like(phi)
                    _coefficients_bwd_phi_kernel[(triton.cdiv(K, block_k),)](
                        x2, grad_acc, grad_phi, T, K, M=width, MP=mp, BLOCK_T=_BLOCK_T, BLOCK_K=block_k
                    )
        dgate = part_gate.sum(0)
        grad_alpha = torch.stack([dgate[:n].sum(), dgate[n : 2 * n].sum(), dgate[2 * n : width].sum()])
        grad_bias = part_bias.sum(0)[:width]
        return (
            grad_x.view(ctx.x_shape),
            grad_phi,
            grad_alpha.to(alpha.dtype),
            grad_bias.to(bias.dtype),
            None,
        )


def mhc_coefficients_triton(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, static_bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mHC coefficients from the flattened streams, in one fused Triton pass.

    Same semantics as `transformers_mhc.models.mhc_ops.mhc_coefficients`.

    Args:
        x: `[N, n*C]` flattened streams (any float dtype; computed in fp32; extra leading dims allowed).
        phi: `[n*n + 2n, n*C]` fused projection, rows ordered (pre, post, res).
        alpha: `[3]` gates (pre, post, res).
        static_bias: `[n*n + 2n]` static logits, same order.
        eps: RMSNorm epsilon.

    Returns:
        `h_pre = sigmoid(·)` `[N, n]`, `h_post = 2·sigmoid(·)` `[N, n]` and the `h_res` logits `[N, n, n]`, fp32.
    """
    if phi.dim() != 2 or x.shape[-1] != phi.shape[1]:
        raise ValueError(
            f"x [..., nC] and phi [n*n + 2n, nC] disagree: {tuple(x.shape)} vs {tuple(phi.shape)}"
        )
    if alpha.numel() != 3 or static_bias.shape != (phi.shape[0],):
        raise ValueError(
            f"alpha must have 3 entries and static_bias shape ({phi.shape[0]},), "
            f"got {tuple(alpha.shape)} and {tuple(static_bias.shape)}"
        )
    return MHCCoefficientsTritonFunction.apply(x, phi, alpha.reshape(3), static_bias, float(eps))


__all__ = ["MHCCoefficientsTritonFunction", "mhc_coefficients_triton"]
