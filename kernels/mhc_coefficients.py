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

The matmuls run on tensor cores: 16-bit streams feed them directly with the fp32 weights and gradients split
into two 16-bit terms (`_dot`), so the result stays as precise as the fp32 torch reference; fp32 streams use
TF32 only when `torch.get_float32_matmul_precision()` allows it (`runtime.dot_precision`), else exact fp32.
At decode (fewer token blocks than SMs) the nC reduction is split across programs (`_k_split`): partial sums
reduced in a fixed order by a second kernel in the forward; in the backward dx needs no reduction.
"""

from __future__ import annotations

from functools import partial

import torch
import triton
import triton.language as tl

from .runtime import INTERPRETED, device_guard, dot_precision, sm_count

# tl.dot needs every dimension >= 16.
_MIN_DOT = 16
_BLOCK_T = 16
# Split-K (decode): with fewer token blocks than SMs, the nC reduction is split across programs, each walking at
# least this many K blocks (fewer would make the partial sums cost more than the walk they save).
_MIN_BLOCKS_PER_SPLIT = 4
# Triton 3.9's interpreter multiplies the raw uint16 bits of bf16 `tl.dot` operands (numpy has no bf16).
_WIDEN_16BIT_DOTS: tl.constexpr = tl.constexpr(INTERPRETED)


def _block_k(mp: int) -> int:
    """K-chunk width: 64, narrowed for n >= 6 to keep the [BLOCK_K, MP] phi tile at 2048 elements: wider, the
    backward (phi and its gradient split into 16-bit pairs) needs ~254 registers at n = 6 and fp32 spills."""
    return max(_MIN_DOT, min(64, 2048 // mp))


def _k_split(num_tokens: int, K: int, block_k: int, sm_count: int) -> tuple[int, int]:
    """(number of splits, K columns per split, a multiple of block_k) for `num_tokens` rows of width K.

    One split while the token blocks alone fill the GPU; otherwise enough splits to give every SM a program, each
    walking at least `_MIN_BLOCKS_PER_SPLIT` K blocks.
    """
    token_blocks = max(1, triton.cdiv(num_tokens, _BLOCK_T))
    k_blocks = triton.cdiv(K, block_k)
    splits = max(1, min(sm_count // token_blocks, k_blocks // _MIN_BLOCKS_PER_SPLIT))
    per_split = triton.cdiv(k_blocks, splits) * block_k
    return triton.cdiv(K, per_split), per_split


@triton.jit
def _split16(v, dtype: tl.constexpr):
    """fp32 `v` as `hi + lo`, both in the 16-bit `dtype` (bf16: relative error <= 2^-18).

    Rounding to nearest is explicit: the interpreter otherwise truncates, which would quadruple the error."""
    hi = v.to(dtype, fp_downcast_rounding="rtne")
    return hi, (v - hi.to(tl.float32)).to(dtype, fp_downcast_rounding="rtne")


@triton.jit
def _dot16(a, b, acc):
    """`acc + a @ b` for 16-bit `a`, `b` with fp32 accumulation; widened exactly to fp32 under the interpreter."""
    if _WIDEN_16BIT_DOTS:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dot(
    a, b, acc, DTYPE: tl.constexpr, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr, DOT_PRECISION: tl.constexpr
):
    """`acc + a @ b` on tensor cores, as precise as fp32 for the 16-bit model dtypes.

    fp32 `DTYPE`: one dot at `DOT_PRECISION` ("ieee", or "tf32" when torch's matmul precision allows it). 16-bit
    `DTYPE`: fp32 operands are split into 16-bit `hi + lo` pairs and `hi·hi + lo·hi + hi·lo` is accumulated in fp32
    (products of 16-bit values are exact in fp32); an operand that is exact in `DTYPE` (`A_EXACT`/`B_EXACT`: the
    streams) is not split, which leaves two dots. These matmuls are thin (n² + 2n wide) next to the bytes read, so
    the extra dots cost no time, while casting the fp32 weights to bf16 would be ~100x less precise than torch.
    """
    if DTYPE == tl.float32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
    elif A_EXACT:
        b_hi, b_lo = _split16(b.to(tl.float32), DTYPE)
        acc = _dot16(a.to(DTYPE), b_hi, acc)
        acc = _dot16(a.to(DTYPE), b_lo, acc)
    elif B_EXACT:
        a_hi, a_lo = _split16(a.to(tl.float32), DTYPE)
        acc = _dot16(a_hi, b.to(DTYPE), acc)
        acc = _dot16(a_lo, b.to(DTYPE), acc)
    else:
        a_hi, a_lo = _split16(a.to(tl.float32), DTYPE)
        b_hi, b_lo = _split16(b.to(tl.float32), DTYPE)
        acc = _dot16(a_hi, b_hi, acc)
        acc = _dot16(a_lo, b_hi, acc)
        acc = _dot16(a_hi, b_lo, acc)
    return acc


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
def _finish(
    acc, ssq, t, alpha_ptr, bias_ptr, pre_ptr, post_ptr, res_ptr, proj_ptr, inv_rms_ptr, num_tokens, K, eps,
    N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
):  # fmt: skip
    """From `x φᵀ` and `Σ x²` of a token block: the RMS division, gates, biases and sigmoids, and their stores."""
    m = tl.arange(0, MP)
    t_ok = t < num_tokens
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
    part_acc_ptr,
    part_ssq_ptr,
    num_tokens,
    K,
    k_per_split,
    eps,
    N: tl.constexpr,
    M: tl.constexpr,
    MP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    m = tl.arange(0, MP)
    t_ok = t < num_tokens
    k_end = tl.minimum(K, (split + 1) * k_per_split)
    acc = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
    ssq = tl.zeros([BLOCK_T], dtype=tl.float32)
    # One sweep over x: the projection and the sum of squares share every load (§5.1).
    for k0 in range(split * k_per_split, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_end
        xb = tl.load(x_ptr + t[:, None] * K + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        # phi is [M, K] row-major; read it as its transpose [BLOCK_K, MP].
        pb = tl.load(phi_ptr + m[None, :] * K + k[:, None], mask=k_ok[:, None] & (m[None, :] < M), other=0.0)
        acc = _dot(xb, pb, acc, x_ptr.dtype.element_ty, True, False, DOT_PRECISION)
        xf = xb.to(tl.float32)  # the RMS in fp32 from the input, whatever the dot's operands
        ssq += tl.sum(xf * xf, axis=1)
    if SPLIT:
        # Partial sums, reduced in a fixed order by `_coefficients_fwd_reduce_kernel`: deterministic, no atomics.
        rows = split * num_tokens + t
        tl.store(part_acc_ptr + rows[:, None] * MP + m[None, :], acc, mask=t_ok[:, None])
        tl.store(part_ssq_ptr + rows, ssq, mask=t_ok)
    else:
        _finish(
            acc, ssq, t, alpha_ptr, bias_ptr, pre_ptr, post_ptr, res_ptr, proj_ptr, inv_rms_ptr, num_tokens, K, eps,
            N, M, MP,
        )  # fmt: skip


@triton.jit
def _coefficients_fwd_reduce_kernel(
    part_acc_ptr, part_ssq_ptr, alpha_ptr, bias_ptr, pre_ptr, post_ptr, res_ptr, proj_ptr, inv_rms_ptr,
    num_tokens, num_splits, K, eps,
    N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    m = tl.arange(0, MP)
    t_ok = t < num_tokens
    acc = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
    ssq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for split in range(num_splits):
        rows = split * num_tokens + t
        acc += tl.load(part_acc_ptr + rows[:, None] * MP + m[None, :], mask=t_ok[:, None], other=0.0)
        ssq += tl.load(part_ssq_ptr + rows, mask=t_ok, other=0.0)
    _finish(
        acc, ssq, t, alpha_ptr, bias_ptr, pre_ptr, post_ptr, res_ptr, proj_ptr, inv_rms_ptr, num_tokens, K, eps,
        N, M, MP,
    )  # fmt: skip


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
    k_per_split,
    N: tl.constexpr,
    M: tl.constexpr,
    MP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    m = tl.arange(0, MP)
    t_ok = t < num_tokens
    t2 = t[:, None]
    m2 = m[None, :]
    row_ok = t_ok[:, None] & (m2 < M)
    # The per-token part (no K dependence) is recomputed by every split: n² + 2n values per token.
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
    dproj = dlogits * gate[None, :]
    # d/dx of the norm: r = (Σx²/K + eps)^-1/2 contributes -(r²/K)(Σ_m dproj·proj) x.
    coef = -tl.sum(dproj * proj, axis=1) * inv_rms * inv_rms / K
    dacc = dproj * inv_rms[:, None]
    if split == 0:
        # Per-block partial sums (reduced on the host): deterministic, no atomics.
        tl.store(part_bias_ptr + pid * MP + m, tl.sum(dlogits, axis=0))
        tl.store(part_gate_ptr + pid * MP + m, tl.sum(dlogits * proj, axis=0))
        tl.store(grad_acc_ptr + t2 * MP + m2, dacc, mask=t_ok[:, None])
    k_end = tl.minimum(K, (split + 1) * k_per_split)
    for k0 in range(split * k_per_split, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_end
        x_mask = t_ok[:, None] & k_ok[None, :]
        xb = tl.load(x_ptr + t2 * K + k[None, :], mask=x_mask, other=0.0).to(tl.float32)
        pb = tl.load(phi_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & k_ok[None, :], other=0.0)
        if MP > 128:  # n >= 11: 16-bit pairs of a [BLOCK_T, >= 256] dacc spill kilobytes, fp32 dots do not
            dx = _dot(dacc, pb, coef[:, None] * xb, tl.float32, False, False, DOT_PRECISION)
        else:
            dx = _dot(dacc, pb, coef[:, None] * xb, x_ptr.dtype.element_ty, False, False, DOT_PRECISION)
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
    DOT_PRECISION: tl.constexpr,
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
        acc = _dot(da_t, xb, acc, x_ptr.dtype.element_ty, False, True, DOT_PRECISION)
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


def _meta(n: int, x_dtype: torch.dtype) -> dict:
    """The constexprs of every coefficient kernel for `n` streams of `x_dtype` (the fp32 dot precision follows
    `torch.get_float32_matmul_precision()` at launch, like torch's own matmuls)."""
    width = n * n + 2 * n
    mp = max(_MIN_DOT, triton.next_power_of_2(width))
    return dict(
        N=n, M=width, MP=mp, BLOCK_T=_BLOCK_T, BLOCK_K=_block_k(mp), DOT_PRECISION=dot_precision(x_dtype)
    )


def _launch_options(meta: dict) -> dict:
    """8 warps from n = 8 (n² + 2n padded to >= 128): at 4, the 16-bit backward needs 255 registers and spills."""
    return {"num_warps": 8 if meta["MP"] >= 128 else 4}


def _reduce_meta(meta: dict) -> dict:
    return {key: meta[key] for key in ("N", "M", "MP", "BLOCK_T")}


def _phi_meta(meta: dict) -> dict:
    return {key: meta[key] for key in ("M", "MP", "BLOCK_T", "BLOCK_K", "DOT_PRECISION")}


def compile_jobs(n: int, dtype: torch.dtype) -> list[tuple]:
    """`(kernel, constexprs, launch options)` of every variant the launchers compile for `n` streams of `dtype`
    (fp32 at both dot precisions), for offline compiles (`benchmarks/ptxas_spills.py`, the tests)."""
    precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
    jobs = []
    for precision in precisions:
        meta = dict(_meta(n, dtype), DOT_PRECISION=precision)
        options = _launch_options(meta)
        jobs += [
            (_coefficients_fwd_kernel, dict(meta, SPLIT=False), options),
            (_coefficients_fwd_kernel, dict(meta, SPLIT=True), options),
            (_coefficients_bwd_x_kernel, meta, options),
            (_coefficients_bwd_phi_kernel, _phi_meta(meta), options),
        ]
    meta = _meta(n, dtype)
    return jobs + [(_coefficients_fwd_reduce_kernel, _reduce_meta(meta), _launch_options(meta))]


# Registered ops (not an autograd.Function), so torch.compile and selective checkpointing take each launch whole.
# The forward also returns the normalised projection and 1/rms, which only the backward reads.
@torch.library.custom_op("transformers_mhc::mhc_coefficients_fwd", mutates_args=())
def mhc_coefficients_fwd(
    x: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, static_bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(h_pre [T, n], h_post [T, n], h_res logits [T, n, n], projection [T, n² + 2n], 1/rms [T])` in fp32 from
    `x [T, nC]`."""
    width, K = phi.shape
    n = _num_streams(width)
    x, phi, alpha, static_bias = (t.contiguous() for t in (x, phi, alpha, static_bias))
    T = x.shape[0]
    dev = x.device
    pre = torch.empty(T, n, device=dev, dtype=torch.float32)
    post = torch.empty(T, n, device=dev, dtype=torch.float32)
    res = torch.empty(T, n, n, device=dev, dtype=torch.float32)
    proj = torch.empty(T, width, device=dev, dtype=torch.float32)
    inv_rms = torch.empty(T, device=dev, dtype=torch.float32)
    meta = _meta(n, x.dtype)
    splits, per_split = _k_split(T, K, meta["BLOCK_K"], sm_count(dev))
    if T > 0:
        token_blocks = triton.cdiv(T, _BLOCK_T)
        # [splits, T, MP] partial projections and [splits, T] partial sums of squares; with one split the kernel
        # writes none, and gets proj and inv_rms as placeholders (a real allocation, not an empty one).
        if splits > 1:
            part_acc = torch.empty(splits, T, meta["MP"], device=dev, dtype=torch.float32)
            part_ssq = torch.empty(splits, T, device=dev, dtype=torch.float32)
        else:
            part_acc, part_ssq = proj, inv_rms
        outputs = (pre, post, res, proj, inv_rms)
        with device_guard(x):
            _coefficients_fwd_kernel[(token_blocks, splits)](
                x, phi, alpha, static_bias, *outputs, part_acc, part_ssq, T, K, per_split, float(eps),
                SPLIT=splits > 1, **meta, **_launch_options(meta),
            )  # fmt: skip
            if splits > 1:
                _coefficients_fwd_reduce_kernel[(token_blocks,)](
                    part_acc, part_ssq, alpha, static_bias, *outputs, T, splits, K, float(eps),
                    **_reduce_meta(meta), **_launch_options(meta),
                )  # fmt: skip
    return pre, post, res, proj, inv_rms


@mhc_coefficients_fwd.register_fake
def _(x, phi, alpha, static_bias, eps):
    width = phi.shape[0]
    n = _num_streams(width)
    T = x.shape[0]
    new = partial(x.new_empty, dtype=torch.float32)
    return new(T, n), new(T, n), new(T, n, n), new(T, width), new(T)


@torch.library.custom_op("transformers_mhc::mhc_coefficients_bwd", mutates_args=())
def mhc_coefficients_bwd(
    x: torch.Tensor,
    phi: torch.Tensor,
    alpha: torch.Tensor,
    static_bias: torch.Tensor,
    proj: torch.Tensor,
    inv_rms: torch.Tensor,
    grad_pre: torch.Tensor,
    grad_post: torch.Tensor,
    grad_res: torch.Tensor,
    want_phi: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(grad_x, grad_phi, grad_alpha, grad_bias)`; `grad_phi` is empty unless `want_phi` (a frozen phi, e.g. PEFT
    without `modules_to_save`, skips the reduction over tokens entirely)."""
    x, phi, alpha, static_bias = (t.contiguous() for t in (x, phi, alpha, static_bias))
    n = _num_streams(phi.shape[0])
    meta = _meta(n, x.dtype)
    width, mp, block_k = meta["M"], meta["MP"], meta["BLOCK_K"]
    T, K = x.shape
    dev = x.device
    blocks = triton.cdiv(T, _BLOCK_T)
    splits, per_split = _k_split(T, K, block_k, sm_count(dev))
    grad_x = torch.empty_like(x)
    grad_acc = torch.empty(T, mp, device=dev, dtype=torch.float32)
    part_bias = torch.zeros(blocks, mp, device=dev, dtype=torch.float32)
    part_gate = torch.zeros(blocks, mp, device=dev, dtype=torch.float32)
    grad_phi = torch.zeros_like(phi) if want_phi else phi.new_empty(0)
    if T > 0:
        # Contiguous: sum().backward() hands stride-0 gradients, and the kernel indexes row-major memory.
        grads = [g.float().contiguous() for g in (grad_pre, grad_post, grad_res)]
        with device_guard(x):
            # dx is elementwise in K given the per-token terms, so the splits need no reduction.
            _coefficients_bwd_x_kernel[(blocks, splits)](
                x, phi, alpha, static_bias, proj, inv_rms, *grads, grad_x, grad_acc, part_bias, part_gate,
                T, K, per_split, **meta, **_launch_options(meta),
            )  # fmt: skip
            if want_phi:
                _coefficients_bwd_phi_kernel[(triton.cdiv(K, block_k),)](
                    x, grad_acc, grad_phi, T, K, **_phi_meta(meta), **_launch_options(meta)
                )
    dgate = part_gate.sum(0)
    grad_alpha = torch.stack([dgate[:n].sum(), dgate[n : 2 * n].sum(), dgate[2 * n : width].sum()])
    return grad_x, grad_phi, grad_alpha.to(alpha.dtype), part_bias.sum(0)[:width].to(static_bias.dtype)


@mhc_coefficients_bwd.register_fake
def _(x, phi, alpha, static_bias, proj, inv_rms, grad_pre, grad_post, grad_res, want_phi):
    grad_phi = torch.empty_like(phi) if want_phi else phi.new_empty(0)
    return torch.empty_like(x), grad_phi, torch.empty_like(alpha), torch.empty_like(static_bias)


def _setup_context(ctx, inputs, output) -> None:
    x, phi, alpha, static_bias, eps = inputs
    proj, inv_rms = output[3:]
    ctx.save_for_backward(x, phi, alpha, static_bias, proj, inv_rms)
    ctx.mark_non_differentiable(proj, inv_rms)


def _backward(ctx, grad_pre, grad_post, grad_res, _grad_proj, _grad_inv_rms):
    x, phi, alpha, static_bias, proj, inv_rms = ctx.saved_tensors
    # A coefficient the loss does not use may come without a gradient: zeros, for the kernel.
    T, n = x.shape[0], _num_streams(phi.shape[0])
    zeros = partial(torch.zeros, device=x.device, dtype=torch.float32)
    grad_pre = grad_pre if grad_pre is not None else zeros(T, n)
    grad_post = grad_post if grad_post is not None else zeros(T, n)
    grad_res = grad_res if grad_res is not None else zeros(T, n, n)
    want_phi = ctx.needs_input_grad[1]
    grad_x, grad_phi, grad_alpha, grad_bias = mhc_coefficients_bwd(
        x, phi, alpha, static_bias, proj, inv_rms, grad_pre, grad_post, grad_res, want_phi
    )
    return grad_x, grad_phi if want_phi else None, grad_alpha, grad_bias, None


mhc_coefficients_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    lead, n = x.shape[:-1], _num_streams(phi.shape[0])
    h_pre, h_post, h_res, _, _ = mhc_coefficients_fwd(
        x.reshape(-1, x.shape[-1]), phi, alpha.reshape(3), static_bias, float(eps)
    )
    return h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n)


__all__ = ["compile_jobs", "mhc_coefficients_bwd", "mhc_coefficients_fwd", "mhc_coefficients_triton"]
